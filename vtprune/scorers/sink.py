"""Visual attention sinks (VAR, Kang et al., ICLR 2025): find them by massive activations, rank them last.

A sink token carries a massive activation in a few fixed dimensions ``D_sink`` of the LLM's residual
stream; it soaks up attention without carrying image content. With ``phi(h) = |h / sqrt(mean(h^2) + 1e-6)|``
(fp32, over the hidden dimension, no norm weight), token ``j`` is a sink when
``max_{d in D_sink} phi(h_j)_d > tau``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vtprune.calibration import CalibrationError, find_calibration, load_calibration, text_hidden_size
from vtprune.config import ConfigError
from vtprune.perthread import PerThread
from vtprune.scorers.base import FIRST_TOKEN_STATE, HIDDEN_STATES, IN_LLM, Scorer, Signals, register
from vtprune.scorers.compose import Wrapper, method_string

# (text model_type, hidden size, intermediate size) -> D_sink, from the VAR paper's code (constants.py). Deviation:
# the release's LogicEngine never switches dim_sink from the 7B entry, so it runs 13B models with (1415, 2533);
# vtprune uses the 13B entry (dims=[1415, 2533] reproduces the release there; benchmarks/parity/sink.py)
KNOWN_SINK_DIMS: dict[tuple[str, int, int], tuple[int, ...]] = {
    ("llama", 4096, 11008): (1415, 2533),  # LLaMA-2-7B / Vicuna-7B (LLaVA-1.5-7B)
    ("llama", 5120, 13824): (2100, 4743),  # LLaMA-2-13B / Vicuna-13B (LLaVA-1.5-13B)
}


DEFAULT_LAYER = 2  # bare `sink` (sink+uniform): FastV's default K, the layer `sink+fastv` uses (our choice)


def massive_activation(hidden: torch.Tensor) -> torch.Tensor:
    """``phi(h) = |h / sqrt(mean(h^2) + 1e-6)|`` in fp32: ``[..., D]`` -> ``[..., D]``.

    At most ``sqrt(D)`` (one dimension holding all the energy), so ``tau = 20`` needs ``D > 400``; tiny
    models need a smaller ``tau``.
    """
    h = hidden.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()


def known_sink_dims(model: Any) -> tuple[int, ...] | None:
    """Published D_sink for the model's language model, or None."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    model_type = getattr(text, "model_type", None)
    if model_type == "llava_llama":  # the original LLaVA codebase's config is a LlamaConfig
        model_type = "llama"
    key = (model_type, getattr(text, "hidden_size", None),
           getattr(text, "intermediate_size", None))
    return KNOWN_SINK_DIMS.get(key)


def rank_last(scores: torch.Tensor, chosen: torch.Tensor, first: bool = False) -> torch.Tensor:
    """Move the ``chosen`` tokens below (``first=False``) or above every other token, keeping their order.

    ``scores`` ``[n]``, ``chosen`` ``[n]`` bool -> ``[n]`` float32. Values stay finite (so the budget is
    refilled by the next-best tokens), ``-inf`` stays ``-inf``. Below: chosen values lie in
    ``(base - 2, base - 1]`` with ``base = min(0, others)``, so they stay negative and below non-negative
    scores after any positive rescaling (an outer ``debias``). Above: ``(top', top' + 1]`` with
    ``top' = 1 + 10 * max(0, others)``.
    """
    s = scores.float().clone()
    pick = chosen & torch.isfinite(s)
    n = int(pick.sum())
    if n == 0:
        return s
    others = s[~chosen & torch.isfinite(s)]
    order = torch.argsort(torch.argsort(s[pick], descending=True, stable=True))  # 0 = best chosen token
    frac = order.float() / n  # in [0, 1)
    if first:
        top = 1.0 + 10.0 * max(0.0, float(others.max())) if others.numel() else 1.0
        s[pick] = top + 1.0 - frac
    else:
        base = min(0.0, float(others.min())) if others.numel() else 0.0
        s[pick] = base - 1.0 - frac
    return s


@register
class Sink(Wrapper):
    """Rank visual sink tokens last ("drop the sinks and re-rank") or first (ablation), in-LLM only.

    Reads the residual stream of the visual tokens at the pruning point: in-LLM, ``hidden_states`` are
    the rows of the output of decoder layer ``layer`` (= the input of layer ``layer + 1``), per sample
    ``[n_b, D]``. The host's scores are kept for the other tokens; sinks get finite scores below every
    other token (``mode="drop"``), so an image's budget is refilled by the next-best non-sinks, or above
    every other token (``mode="keep"``, the ablation switch). Sinks are only dropped when the budget
    allows: an image whose non-sink tokens cannot fill ``keep`` keeps some sinks.

    Runs inside the LLM only (the residual stream does not exist before it). Named alone, ``sink`` is
    ``sink+uniform`` (sinks removed, the budget spread evenly over the rest of the grid) after layer
    `DEFAULT_LAYER` (2) unless ``layer=K`` is given; ``sink+fastv`` uses FastV's layer.

    D_sink, resolved by `bind` in this order: ``dims=[...]``; the file given as ``calibration=PATH``;
    the published dims of LLaMA-2/Vicuna-7B ``{1415, 2533}`` and 13B ``{2100, 4743}``; the model's
    calibration file (see `vtprune.calibration`); otherwise found on the fly in every prefill, as VAR
    finds them (massive activations of the first token): per sample the dimensions where the first real
    token's residual stream at the pruning layer has ``phi > tau`` (`first_token_sink_dims`; none found:
    no token is a sink). ``dims_source`` says which applied.

    Options:
        tau: sink threshold on ``phi`` (default 20, the paper's). ``phi <= sqrt(D)``, so tiny test models
            (D = 64) need ``tau < 8``.
        dims: explicit sink dimensions (list of ints).
        mode: ``"drop"`` (default) or ``"keep"``.
        calibration: path of a calibration file to read ``sink.dims`` from.

    After each scoring call ``last_sinks`` holds per sample a sorted ``[s_b]`` LongTensor of the visual
    tokens (indices into that sample's visual tokens, as in `PruneStats.kept`) detected as sinks, and
    ``last_dims`` per sample the ``[s_d]`` sink dimensions used (the on-the-fly ones, or the fixed ones).
    """

    name = "sink"
    description = ("VAR sinks: visual tokens with massive activations in the sink dims ranked last; "
                   "in-LLM (alone: sink+uniform after layer 2, or layer=K)")
    needs = frozenset({HIDDEN_STATES})
    default_host = "uniform"
    allowed_stages = (IN_LLM,)

    last_sinks = PerThread(factory=list)  # a per-call debugging record: each thread sees its own
    last_dims = PerThread(factory=list)

    @property
    def default_layer(self) -> int:  # type: ignore[override]
        """The host's layer (``sink+fastv``: FastV's); a host without one (``uniform``, which defaults to
        pre-LLM) prunes at `DEFAULT_LAYER`, so bare ``sink`` runs without ``layer=K``."""
        inner = self.inner.default_layer
        return inner if inner is not None else DEFAULT_LAYER

    def __init__(self, inner: Scorer, tau: float = 20.0, dims: list[int] | None = None, mode: str = "drop",
                 calibration: str | None = None) -> None:
        super().__init__(inner)
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ConfigError(f"sink: tau must be a positive number (default 20), got {tau!r}")
        if dims is not None:
            if isinstance(dims, int) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in dims) or not list(dims):
                raise ConfigError(f"sink: dims must be a non-empty list of non-negative ints, got {dims!r}")
            dims = [int(d) for d in dims]
        if mode not in ("drop", "keep"):
            raise ConfigError(f"sink: mode must be 'drop' (rank sinks last) or 'keep' (rank them first), got {mode!r}")
        if IN_LLM not in inner.stages:
            raise ConfigError(
                f"sink reads the LLM's residual stream, so it runs only inside the LLM, but "
                f"{method_string(inner)!r} prunes only before the LLM; use a host that runs in the LLM "
                "(e.g. 'sink+fastv', or 'sink+uniform' with layer=K)"
            )
        self.tau = float(tau)
        self.dims = dims
        self.mode = mode
        self.calibration = calibration
        self._dims: list[int] | None = dims
        self.dims_source = "dims option" if dims is not None else None
        self.last_sinks: list[torch.Tensor] = []

    def tunable(self, model: Any, adapter: Any) -> dict[str, tuple[Any, Any]]:
        from vtprune.tunable import Param

        top = max(2.0, math.sqrt(text_hidden_size(model.config)))  # phi <= sqrt(D)
        return {"tau": (Param("float", 1.0, top), min(float(self.tau), top))}

    def bind_self(self, model: Any, adapter: Any) -> None:
        hidden = text_hidden_size(model.config)
        dims, source = self.dims, "dims option"
        if dims is None and self.calibration is not None:
            dims, source = self._dims_from_file(load_calibration(self.calibration, model), self.calibration)
        if dims is None:
            known = known_sink_dims(model)
            if known is not None:
                dims, source = list(known), "published dims (LLaMA-2 / Vicuna)"
        if dims is None:
            path = find_calibration(model)
            if path is not None:
                dims, source = self._dims_from_file(load_calibration(path, model), path)
        if dims is None:  # neither given, published nor calibrated: VAR's rule on every prefill
            self._dims, self.dims_source = None, "on the fly (the first token's massive activations, each prefill)"
            return
        bad = [d for d in dims if d >= hidden]
        if bad:
            raise ConfigError(f"sink: dims {bad} are out of range for hidden size {hidden} (from {source})")
        self._dims, self.dims_source = list(dims), str(source)

    @staticmethod
    def _dims_from_file(data: dict, path: Any) -> tuple[list[int], str]:
        sink = data.get("sink") or {}
        dims = sink.get("dims")
        if not dims:
            raise CalibrationError(
                f"sink: the calibration file {str(path)!r} found no sink dimensions for this model "
                f"({sink.get('note', 'no massive activations')}); pass dims=[...] explicitly, or do not use sink"
            )
        return [int(d) for d in dims], f"calibration file {path}"

    def needs_signal(self, name: str) -> bool:
        # the first token's state only where the dims are found on the fly
        return (name == FIRST_TOKEN_STATE and self.dims_source is not None and self._dims is None) \
            or super().needs_signal(name)

    def detect(self, hidden: torch.Tensor, dims: torch.Tensor | None = None) -> torch.Tensor:
        """``[n, D]`` residual-stream rows -> ``[n]`` bool, True on sinks: ``phi > tau`` in a sink dimension.

        ``dims``: ``[D]`` bool, the sink dimensions (default: the resolved ``dims``)."""
        if dims is None:
            if self._dims is None:
                raise RuntimeError("sink: dims are unknown; call bind(model, adapter) or pass dims=[...]")
            index = torch.tensor(self._dims, device=hidden.device)
            return massive_activation(hidden).index_select(-1, index).amax(-1) > self.tau
        return ((massive_activation(hidden) > self.tau) & dims.to(hidden.device)).any(-1)

    def transform(self, scores: list[torch.Tensor], signals: Signals) -> list[torch.Tensor]:
        hidden = signals.require(HIDDEN_STATES)
        first = signals.require(FIRST_TOKEN_STATE) if self._dims is None else None  # [B, D]
        out, found, used = [], [], []
        for b, (s, h) in enumerate(zip(scores, hidden)):
            dims = first_token_sink_dims(first[b], self.tau) if first is not None else None
            sinks = self.detect(h, dims).to(s.device)
            found.append(torch.nonzero(sinks).flatten().cpu())
            used.append(torch.nonzero(dims).flatten() if dims is not None else torch.tensor(self._dims))
            out.append(rank_last(s, sinks, first=self.mode == "keep"))
        self.last_sinks = found
        self.last_dims = used
        return out


def first_token_sink_dims(first: torch.Tensor, tau: float) -> torch.Tensor:
    """``[D]`` first-token residual stream -> ``[D]`` bool: the dimensions of its massive activations
    (``phi > tau``), VAR's definition of the sink dimensions, found from the prefill itself."""
    return massive_activation(first) > tau
