"""Method stages: the one interface through which a method adds runtime work beyond its scores.

Most methods only score; the runtime scores, selects and compacts for them. Some need more: VisionZip
records vision keys and merges features into its contextual tokens, FlowCut prunes inside the vision
tower, staged methods compute their own per-stage signals, SparseVLM recycles tokens, VFlowOpt merges
before the LLM. Each such need is a method of `MethodStage`; the runtime calls them for every setup and
never asks which method it runs.

- `ScorerStage` (the default) serves every scorer from what the scorer itself declares
  (`Scorer.model_hooks`, `Scorer.stage_signals`, `Scorer.stage_select`, `Scorer.select_and_merge`).
- Methods whose stage needs the model's internals (VisionZip, FlowCut) register their own subclass for
  their scorer class with `register_stage`; `stage_for` finds it under any wrappers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vtprune.config import ConfigError
from vtprune.scorers.base import Scorer
from vtprune.scorers.compose import innermost
from vtprune.signals import per_sample

if TYPE_CHECKING:
    from vtprune.adapters.base import Adapter
    from vtprune.scorers.select import Selection
    from vtprune.signals import Signals
    from vtprune.state import PruneState

# Session.extras key: per sample the sorted indices (into the prefill's visual tokens) of the kept tokens a
# pre-LLM merge wrote merged features into, when the method names them; LLM stages that follow count the
# survivors among them for `PruneStats.contextual` (`contextual_among`)
CONTEXTUAL = "contextual_slots"


def contextual_among(slots: list[torch.Tensor] | None, kept: list[torch.Tensor]) -> list[int] | None:
    """Per sample how many of ``kept`` (visual indices) are merged slots ``slots`` (None: not known)."""
    if slots is None:
        return None
    return [int(torch.isin(k.cpu(), s.cpu()).sum()) for k, s in zip(kept, slots)]


class MethodStage:
    """What a method needs from the runtime besides its scores. ``host``: the innermost scorer.

    Every hook has a neutral default, so the runtime calls all of them unconditionally.
    """

    # a message for `stage_for` when an ensemble holds this method: an ensemble only combines scores
    ensemble_error: str | None = None
    # whether the adapter must record the vision features entering the projector during encoding
    records_merge_features: bool = False
    # whether `llm_signals` adds signals (the runtime then keeps the pruning layer's RoPE tables for it)
    has_llm_signals: bool = False

    def __init__(self, host: Scorer) -> None:
        self.host = host

    def hooks(self, adapter: Adapter, state: PruneState) -> list:
        """Model hooks the method installs (handles with ``remove()``)."""
        return []

    def pre_llm(self, adapter: Adapter, state: PruneState, images: Any, signals: Signals,
                embeds: torch.Tensor, budget: Any) -> tuple[Selection, torch.Tensor, Any, Any] | None:
        """Select (and possibly merge) before the LLM: ``(selection, embeds [B, N, D], contextual per sample,
        scores)``, or None to let the runtime score and select by top-k. ``contextual``: how many of each
        sample's kept tokens carry merged features (counted in the kept ones; None for no merge). A stage
        that knows which ones they are records them in ``state.session.extras[CONTEXTUAL]``."""
        return None

    def llm_signals(self, signals: Signals, hooks: Any, hidden: torch.Tensor, layer: int) -> None:
        """Add the method's own signals at an in-LLM pruning layer (``hidden`` ``[B, N_cur, D]``)."""

    def llm_select(self, scores: list[torch.Tensor], signals: Signals,
                   hidden: torch.Tensor) -> tuple[list[torch.Tensor], dict] | None:
        """Select at an in-LLM pruning layer: ``(kept per sample, rows to overwrite)``, or None for top-k."""
        return None


def _overrides(host: Scorer, name: str) -> bool:
    return getattr(type(host), name) is not getattr(Scorer, name)


class ScorerStage(MethodStage):
    """The default stage: whatever the host scorer declares for itself."""

    def __init__(self, host: Scorer) -> None:
        super().__init__(host)
        self.merges = _overrides(host, "select_and_merge")
        self.has_llm_signals = _overrides(host, "stage_signals")

    def hooks(self, adapter: Adapter, state: PruneState) -> list:
        return self.host.model_hooks(adapter, state)

    def pre_llm(self, adapter, state, images, signals, embeds, budget):
        if not self.merges:
            return None
        scores = per_sample(state.scorer.score(signals), signals.layout)
        merged = self.host.select_and_merge(scores, signals, embeds, budget)
        if merged is None:
            return None
        from vtprune.scorers.select import Selection

        kept, embeds, slots = merged
        state.session.extras[CONTEXTUAL] = list(slots)  # read only when the stats are built
        return Selection.from_kept(signals.layout, kept), embeds, [int(c.numel()) for c in slots], scores

    def llm_signals(self, signals, hooks, hidden, layer) -> None:
        self.host.stage_signals(signals, hooks, hidden, layer)

    def llm_select(self, scores, signals, hidden):
        return self.host.stage_select(scores, signals, hidden)


_STAGES: dict[type[Scorer], type[MethodStage]] = {}


def register_stage(scorer_cls: type[Scorer]):
    """Class decorator: the `MethodStage` of ``scorer_cls`` (and its subclasses)."""
    def deco(cls: type[MethodStage]) -> type[MethodStage]:
        _STAGES[scorer_cls] = cls
        return cls

    return deco


def _registered(scorer: Scorer) -> type[MethodStage] | None:
    for klass in type(scorer).__mro__:
        if klass in _STAGES:
            return _STAGES[klass]
    return None


def stage_for(scorer: Scorer) -> MethodStage:
    """The `MethodStage` of ``scorer``'s host (under any wrappers).

    Raises `ConfigError` when an ensemble member needs a stage of its own: an ensemble only combines
    scores, so that member's stage would be silently lost.
    """
    host = innermost(scorer)
    for member in getattr(host, "members", None) or ():
        cls = _registered(innermost(member))
        if cls is not None:
            raise ConfigError(cls.ensemble_error or f"{innermost(member).name} cannot be an ensemble member")
        stage_for(member)
    cls = _registered(host) or ScorerStage
    return cls(host)
