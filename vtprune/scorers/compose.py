"""Composition: wrappers that transform another scorer's scores, method strings joined with ``+``, ensembles.

A method string names zero or more wrappers and one host scorer, outermost first:
``"debias+sink+fastv"`` is ``Debias(Sink(FastV()))``. Options go to the component that declares them;
a name that several components declare must be qualified as ``"<component>.<option>"``
(``{"sink.tau": 30}``). ``Ensemble`` combines full scorers (themselves possibly composed).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from vtprune.config import ConfigError
from vtprune.scorers.base import Scorer, Signals, register, registry, scorer_options
from vtprune.signals import per_sample


def refuse_per_tile(method: str, member: Scorer, why: str) -> None:
    """`ConfigError` where ``member`` of the composition ``method`` selects per tile (`Scorer.per_tile`): its
    tiles have no per-token scores to compose (``why``)."""
    if member.per_tile:
        raise ConfigError(f"{method}: {member.name} selects per tile on this model (its release's LLaVA-NeXT "
                          f"path), where {why}: pass {member.name}.budget_per='image'")


class Wrapper(Scorer):
    """A scorer that reads another scorer's scores (``inner``) and returns corrected ones.

    Subclasses set ``name``/``description``, declare extra ``needs`` and implement `transform`. The
    wrapper runs wherever its host runs (``stages`` and ``default_layer`` come from the host, limited
    by ``allowed_stages``) and passes the host's vision options through (``vision_layer``).
    """

    is_wrapper: ClassVar[bool] = True
    default_host: ClassVar[str | None] = None  # the host used when the wrapper is named alone ("sink")
    allowed_stages: ClassVar[tuple[str, ...] | None] = None  # None: any stage the host supports

    def __init__(self, inner: Scorer) -> None:
        if not isinstance(inner, Scorer):
            raise ConfigError(f"{type(self).__name__} wraps a scorer, got {type(inner).__name__}")
        self.inner = inner

    # the host's properties, seen through the wrapper
    @property
    def stages(self) -> tuple[str, ...]:  # type: ignore[override]
        host = self.inner.stages
        return tuple(s for s in host if self.allowed_stages is None or s in self.allowed_stages)

    @property
    def default_layer(self) -> int | None:  # type: ignore[override]
        return self.inner.default_layer

    @property
    def vision_layer(self):
        return getattr(self.inner, "vision_layer", None)

    @property
    def accepts_auto_keep(self) -> bool:  # type: ignore[override]
        return self.inner.accepts_auto_keep

    @property
    def ranks_fixed(self) -> bool:  # type: ignore[override]
        return self.inner.ranks_fixed

    own_excludes: ClassVar[bool] = False  # the wrapper itself may write -inf (debias's padding)

    @property
    def excludes(self) -> bool:  # type: ignore[override]
        return self.own_excludes or self.inner.excludes

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        return self.inner.requires

    def needs_signal(self, name: str) -> bool:
        return name in self.needs or self.inner.needs_signal(name)

    def bind(self, model, adapter) -> None:
        self.inner.bind(model, adapter)
        refuse_per_tile(self.method_string(), self.inner, f"{self.name} has no token scores to correct")
        self.bind_self(model, adapter)

    # the host's plan: a wrapper corrects scores wherever the host prunes, at every stage it plans
    def schedule(self, model, adapter, layer, keep):
        return self.inner.schedule(model, adapter, layer, keep)

    def llm_stages(self, model, adapter, keep):
        return self.inner.llm_stages(model, adapter, keep)

    def bind_self(self, model, adapter) -> None:
        """The wrapper's own `bind` (the host is bound first)."""

    def score(self, signals: Signals) -> list[torch.Tensor]:
        return self.transform(per_sample(self.inner.score(signals), signals.layout), signals)

    def transform(self, scores: list[torch.Tensor], signals: Signals) -> list[torch.Tensor]:
        """Per sample ``[n_b]`` host scores -> corrected scores (``-inf``: never keep the token)."""
        raise NotImplementedError

    def method_string(self) -> str:
        return f"{self.name}+{method_string(self.inner)}"


def innermost(scorer: Scorer) -> Scorer:
    """The host under any wrappers (``debias+sink+fastv`` -> the FastV scorer)."""
    while isinstance(scorer, Wrapper):
        scorer = scorer.inner
    return scorer


def host_of(scorer: Scorer, cls: type[Scorer], ensemble_error: str) -> Scorer | None:
    """The ``cls`` host under any wrappers, or None when ``scorer`` has none.

    For stage-changing hosts (VisionZip's merge, FlowCut's in-tower pruning) that an ensemble of scores
    cannot carry: raises `ConfigError` with ``ensemble_error`` when an ensemble member is one.
    """
    scorer = innermost(scorer)
    if isinstance(scorer, cls):
        return scorer
    for member in getattr(scorer, "members", None) or ():
        if host_of(member, cls, ensemble_error) is not None:
            raise ConfigError(ensemble_error)
    return None


# a member overriding one of these plans or selects itself; an ensemble only combines scores, so it would be lost
SELF_PLANNING = ("schedule", "llm_stages", "select_and_merge", "stage_select", "stage_signals", "model_hooks")


def self_planning(scorer: Scorer) -> list[str]:
    """The `Scorer` methods of ``SELF_PLANNING`` that ``scorer``'s host (under any wrappers) overrides."""
    host = innermost(scorer)
    return [name for name in SELF_PLANNING if getattr(type(host), name) is not getattr(Scorer, name)]


def method_string(scorer: Scorer) -> str:
    """The method string that builds ``scorer`` (``"debias+fastv"``)."""
    if isinstance(scorer, Wrapper):
        return scorer.method_string()
    return scorer.name


def scorer_config_options(scorer: Scorer) -> dict[str, Any]:
    """The options (qualified ``"<component>.<option>"``) that rebuild ``scorer`` from its method string.

    Options are read back from same-named attributes; values that equal the defaults are left out.
    """
    out: dict[str, Any] = {}
    node: Scorer | None = scorer
    while node is not None:
        for opt, default in scorer_options(type(node)).items():
            if opt == "inner" or not hasattr(node, opt):
                continue
            value = getattr(node, opt)
            if opt == "members":
                value = [method_string(m) for m in value]
            if value != default:
                out[f"{node.name}.{opt}"] = value
        node = node.inner if isinstance(node, Wrapper) else None
    return out


def _split(method: str) -> list[str]:
    """Components of a method string, outermost first. A registered name may itself end with '+'
    (``prumerge+``): an empty component right after such a name belongs to it."""
    reg = registry()
    parts: list[str] = []
    for p in (p.strip().lower() for p in method.split("+")):
        if not p and parts and parts[-1] + "+" in reg:
            parts[-1] += "+"
        else:
            parts.append(p)
    if any(not p for p in parts):
        raise ConfigError(f"method {method!r} has an empty component; join names with '+', e.g. 'debias+fastv'")
    return parts


def build_scorer(method: str, options: dict[str, Any]) -> Scorer:
    """Build the scorer named by ``method`` (``"name"`` or ``"wrapper+...+host"``) with ``options``.

    Raises `ConfigError` naming the fix for unknown names, a wrapper in host position (or a host in
    wrapper position), and unknown or ambiguous options.
    """
    reg = registry()
    parts = _split(method)
    for p in parts:
        if p not in reg:
            raise ConfigError(f"unknown method {p!r} in {method!r}; known methods: {', '.join(sorted(reg))}")
    if getattr(reg[parts[-1]], "is_wrapper", False) and getattr(reg[parts[-1]], "default_host", None):
        parts.append(reg[parts[-1]].default_host)
    *wrappers, host = parts
    if getattr(reg[host], "is_wrapper", False):
        raise ConfigError(
            f"{host!r} wraps another scorer and cannot stand last in {method!r}: end with a host scorer, "
            f"e.g. '{host}+fastv'"
        )
    for w in wrappers:
        if not getattr(reg[w], "is_wrapper", False):
            raise ConfigError(
                f"{w!r} is a scorer, not a wrapper, so it cannot come before '+' in {method!r}; "
                "only wrappers (debias, sink) compose this way; use 'ensemble' to combine scorers"
            )
    if len(set(parts)) != len(parts):
        raise ConfigError(f"method {method!r} names a component twice")
    per_part: dict[str, dict[str, Any]] = {p: {} for p in parts}
    declared = {p: set(scorer_options(reg[p])) - {"inner"} for p in parts}
    for key, value in options.items():
        if "." in key:
            part, opt = key.split(".", 1)
            if part not in per_part:
                raise ConfigError(f"option {key!r} names {part!r}, which is not part of {method!r}")
            if opt not in declared[part]:
                raise ConfigError(f"{part!r} has no option {opt!r}; its options: {_describe(reg[part])}")
            per_part[part][opt] = value
            continue
        owners = [p for p in parts if key in declared[p]]
        if not owners:
            hint = "; ".join(f"{p}: {_describe(reg[p])}" for p in parts)
            raise ConfigError(f"method {method!r} has no option {key!r}; options: {hint}")
        if len(owners) > 1:
            raise ConfigError(
                f"option {key!r} is declared by {owners} in {method!r}; qualify it, e.g. '{owners[0]}.{key}'"
            )
        per_part[owners[0]][key] = value
    scorer = _instantiate(reg[host], per_part[host], host)
    for w in reversed(wrappers):
        scorer = _instantiate(reg[w], per_part[w], w, inner=scorer)
    return scorer


def _describe(cls: type[Scorer]) -> str:
    known = {k: v for k, v in scorer_options(cls).items() if k != "inner"}
    return ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"


def _instantiate(cls: type[Scorer], opts: dict[str, Any], name: str, **extra: Any) -> Scorer:
    try:
        return cls(**extra, **opts)
    except ConfigError:
        raise  # the component's own message names it already
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name}: {err}") from None


# ---- ensembles ---------------------------------------------------------------------------------
def _normalise(s: torch.Tensor, idx: torch.Tensor, mode: str) -> torch.Tensor:
    """Scores of one image's tokens ``idx`` mapped to [0, 1] (min-max, or rank percentile)."""
    v = s[idx].float()
    finite = torch.isfinite(v)
    out = torch.zeros_like(v)
    if not bool(finite.any()):
        return torch.full_like(v, float("-inf"))
    if mode == "rank":
        order = torch.argsort(torch.argsort(torch.where(finite, v, torch.full_like(v, -torch.inf)), stable=True))
        out = order.float() / max(1, v.numel() - 1)
    else:
        lo, hi = v[finite].min(), v[finite].max()
        out = (v - lo) / (hi - lo) if float(hi - lo) > 0 else torch.ones_like(v)
    return torch.where(finite, out, torch.full_like(out, float("-inf")))


@register
class Ensemble(Scorer):
    """Weighted combination of scorers, each normalised per image first.

    Options:
        members: method strings (``["fastv", "cls"]``) or `Scorer` objects; composed ones allowed.
        weights: one weight per member (default: equal).
        mode: ``"score"`` (min-max normalised scores) or ``"rank"`` (rank percentiles).

    A token any member excludes (``-inf``) stays excluded. The ensemble runs where every member can:
    members that only prune before the LLM and members that only prune inside it cannot be mixed.
    """

    name = "ensemble"
    description = "Weighted ensemble of scorers by normalised score or rank (members=[...], weights=[...])"

    def __init__(self, members: list | None = None, weights: list[float] | None = None, mode: str = "rank") -> None:
        if not members:
            raise ConfigError("ensemble needs members, e.g. members=['fastv', 'random'] (method strings or scorers)")
        self.members = [m if isinstance(m, Scorer) else build_scorer(str(m), {}) for m in members]
        if weights is None:
            weights = [1.0] * len(self.members)
        if len(weights) != len(self.members) or any(float(w) < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(
                f"ensemble weights must be {len(self.members)} non-negative numbers with a positive sum, got {weights!r}"
            )
        if mode not in ("score", "rank"):
            raise ConfigError(f"ensemble mode must be 'score' or 'rank', got {mode!r}")
        self.weights = [float(w) for w in weights]
        self.mode = mode
        for m in self.members:
            own = self_planning(m)
            if own and not isinstance(innermost(m), Ensemble):
                raise ConfigError(
                    f"{method_string(m)} plans its own stages or selection ({', '.join(own)}), which an ensemble "
                    "of scores would silently drop: run it alone, or ensemble scorers that only score "
                    "(cls, fastv, vtc-cls, divprune, ...)")
        common = [s for s in self.members[0].stages if all(s in m.stages for m in self.members)]
        if not common:
            raise ConfigError(
                "ensemble members run at different stages (before the LLM vs inside it): "
                + ", ".join(f"{method_string(m)}: {m.stages}" for m in self.members)
            )
        self.stages = tuple(common)
        layers = [m.default_layer for m in self.members if m.default_layer is not None]
        # pre-LLM when every member defaults there; otherwise the deepest member default (or layer=K)
        self.default_layer = None if not layers and "pre-llm" in common else (max(layers) if layers else None)

    def needs_signal(self, name: str) -> bool:
        return any(m.needs_signal(name) for m in self.members)

    @property
    def accepts_auto_keep(self) -> bool:  # type: ignore[override]
        return all(m.accepts_auto_keep for m in self.members)

    @property
    def excludes(self) -> bool:  # type: ignore[override]
        return any(m.excludes for m in self.members)

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset().union(*(m.requires for m in self.members))

    @property
    def vision_layer(self):
        """The vision layers the adapter hooks for the members' shared CLS-type signal.

        Members read one signal, recorded at one set of layers: those of the first member that names
        any (read after `bind`, so ``vtc-cls`` members contribute their resolved range).
        """
        for m in self.members:
            layers = getattr(m, "vision_layer", None)
            if layers is not None:
                return layers
        return None

    def bind(self, model, adapter) -> None:
        for m in self.members:
            m.bind(model, adapter)
            refuse_per_tile(method_string(self), m, "an ensemble has no per-token scores of it to combine")

    def score(self, signals: Signals) -> list[torch.Tensor]:
        lay = signals.layout
        member_scores = [per_sample(m.score(signals), lay) for m in self.members]
        out = []
        for b in range(lay.batch_size):
            total = torch.zeros(int(lay.positions[b].numel()))
            for idx in lay.image_slices(b):
                acc = torch.zeros(int(idx.numel()))
                for w, scores in zip(self.weights, member_scores):
                    acc = acc + w * _normalise(scores[b].cpu(), idx.cpu(), self.mode)
                total[idx.cpu()] = acc
            out.append(total.to(lay.positions[b].device))
        return out
