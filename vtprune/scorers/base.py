"""The scorer interface: a scorer declares the signals it needs and ranks visual tokens.

Adapters compute a signal only when the active scorer asks for it, so a scorer that needs nothing
(random, uniform) costs nothing, and the CLS row or the LLM attention row is recomputed only for the
scorers that read it.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch

from vtprune.signals import (  # noqa: F401  (the signal vocabulary, re-exported for scorers)
    FIRST_TOKEN_STATE,
    HIDDEN_STATES,
    IN_LLM,
    INSTRUCTION,
    LLM_ATTENTION,
    PIXEL_VALUES,
    PRE_LLM,
    SIGNALS,
    VISION_CLS_ATTENTION,
    VISION_FEATURES,
    Signals,
)


class Scorer:
    """Base class. Subclasses set the class attributes and implement `score`.

    - ``name``: preset name; ``description``: one line for `vtprune.methods()`.
    - ``needs``: signal names (see ``SIGNALS``) the adapter must provide.
    - ``stages``: where the scorer can run (``"pre-llm"``, ``"llm"``).
    - ``default_layer``: the in-LLM layer used when the config leaves ``layer`` as None
      (None: run pre-LLM by default).
    - ``excludes``: whether `score` may return ``-inf`` to exclude tokens (then an image keeps at most its
      finite-scored tokens; the selection reads those counts from the device once).
    - ``accepts_auto_keep``: whether an adaptive budget (``keep="auto:0.95"``) can be chosen from the
      scores: False for methods that place a fixed number of tokens themselves (a lattice, a merge plan).
    - ``per_tile``: whether the scorer selects per tile of LLaVA-NeXT's anyres image, each tile's whole
      encoder grid with its own budget, before the unpadding drops the grid's padding (the NeXT releases
      of VisPruner and CDPruner): the runtime then calls `score_tiles` and `select_tiles` instead of
      `score` and the per-image selection (an instance sets it in `bind`, where the adapter is ``tiled``,
      and offers ``budget_per='image'`` to turn it off: wrappers and ensembles need per-token scores; a
      method with a pre-LLM stage of its own, VisionZip, plans per tile there);
      ``drops_fixed``: there, the never-pruned tokens are dropped too (releases that feed no newlines).
    - ``ranks_fixed``: whether the never-pruned tokens (LLaVA-NeXT image newlines) are candidates ranked
      inside the image's budget rather than kept beside it: the runtime then scores and selects on
      `VisualLayout.all_candidates` (an instance may set it from an option: DivPrune's release).

    Options are the keyword arguments of ``__init__``; unknown options are rejected by name.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    stages: ClassVar[tuple[str, ...]] = (PRE_LLM, IN_LLM)
    default_layer: ClassVar[int | None] = None
    accepts_auto_keep: ClassVar[bool] = True
    # whether `score` may return -inf for tokens it excludes (the selection then reads the finite counts
    # once per prefill); scorers that always return finite scores leave it False and select without a read
    excludes: ClassVar[bool] = False
    ranks_fixed: bool = False
    per_tile: bool = False
    drops_fixed: bool = False
    # model capabilities the method needs beyond the signals (an adapter lacking one refuses the method,
    # see `Adapter.lacks`): "vision_tower_masking" (pruning inside the vision tower), "pre_llm_then_llm"
    # (LLM stages on a sequence shortened before the LLM)
    requires: ClassVar[frozenset[str]] = frozenset()
    # the settings of the attention-debiasing release's patch of this method (github.com/intcomp/attention-bias),
    # read by `vtprune.scorers.debias.Debias` for its "auto" options: {"trend": "exp:<lambda>" |
    # "cubic:<a1>,<a2>,<a3>", "pad_theta": float, "pad_mode": "exclude" | "zero", "source": str}; None: no patch
    debias_release: ClassVar[dict[str, Any] | None] = None

    def score(self, signals: Signals) -> list[torch.Tensor] | torch.Tensor:
        """Return per sample a ``[n_b]`` float tensor, or one ``[B, N_max]`` tensor (``-inf`` on padding slots,
        `VisualLayout.padded`): higher means keep. `vtprune.signals.per_sample` turns either into the list."""
        raise NotImplementedError

    def needs_signal(self, name: str) -> bool:
        return name in self.needs

    def score_tiles(self, signals: Signals) -> torch.Tensor:
        """For a scorer with ``per_tile`` set: ``[T, S]`` float scores over every tile's grid (higher = keep;
        rows before ``signals.tile_first`` are ignored), from ``signals.tile_cls_attention`` /
        ``tile_features`` (see `Signals`); `vtprune.scorers.select.select_tiles` keeps each tile's best."""
        raise NotImplementedError(f"{self.name} sets per_tile but does not score tiles")

    def schedule(self, model: Any, adapter: Any, layer: int, keep: Any) -> list[tuple[int, Any]]:
        """In-LLM pruning points ``[(layer K_j, per-image budget), ...]`` in increasing layer order.

        Default: one stage, ``[(layer, keep)]``. Staged methods (TransPrune, SparseVLM) return several;
        each later stage selects among the tokens the earlier ones kept, and ``keep`` is the final count.
        """
        return [(layer, keep)]

    def llm_stages(self, model: Any, adapter: Any, keep: Any) -> tuple[Any, list[tuple[int, Any]]]:
        """For a method that prunes before the LLM and again inside it (VFlowOpt): ``(pre-LLM budget,
        [(layer, budget), ...])``. Default: ``(keep, [])``, pre-LLM only."""
        return keep, []

    def model_hooks(self, adapter: Any, state: Any) -> list:
        """Hooks a method installs on the model itself (handles with ``remove()``); default none."""
        return []

    # ---- the method's own stage work (called by the runtime's default `MethodStage`) -------------
    def stage_signals(self, signals: Signals, hooks: Any, hidden: torch.Tensor, layer: int) -> None:
        """At an in-LLM pruning layer, add the method's own signals to ``signals`` (``hidden``: the layer's
        output ``[B, N_cur, D]``; ``hooks``: the runtime's LLM-stage hooks, for the stage's RoPE and mask).
        Default: nothing (the declared `needs` are enough)."""

    def stage_select(self, scores: list[torch.Tensor], signals: Signals,
                     hidden: torch.Tensor) -> tuple[list[torch.Tensor], dict] | None:
        """At an in-LLM pruning layer, select itself: ``(kept indices per sample, {sample: (indices, [m, D]
        rows written into kept slots)})``. Default None: the runtime's batched top-k."""
        return None

    def select_and_merge(self, scores: list[torch.Tensor], signals: Signals, embeds: torch.Tensor,
                         budget: Any) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]] | None:
        """Before the LLM, select and write merged features into kept slots: ``(kept per sample, embeds,
        merged slots per sample)``, the slots as sorted visual indices among the kept (LLM stages that follow
        count the survivors). Default None: the runtime's batched top-k, no merge."""
        return None

    def tunable(self, model: Any, adapter: Any) -> dict[str, tuple[Any, Any]]:
        """Options `vtprune tune` may search on this model: name -> ``(vtprune.tunable.Param, current value)``.

        Only this component's own options (wrappers' hosts declare theirs); called after `bind`.
        Default: none.
        """
        return {}

    def bind(self, model: Any, adapter: Any) -> None:
        """Called once by `vtprune.apply` with the model and its adapter, before any hook is installed.

        Scorers that depend on the model (calibration files, known sink dimensions, layer ranges)
        resolve it here and raise `ConfigError` when the model cannot serve them. Default: nothing.
        """


_REGISTRY: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: register a scorer under ``cls.name``."""
    if not cls.name or not cls.description:
        raise TypeError(f"{cls.__name__} needs a name and a description to be registered")
    unknown = set(cls.needs) - set(SIGNALS)
    if unknown:
        raise TypeError(f"{cls.__name__} needs unknown signals {sorted(unknown)}; known: {SIGNALS}")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Scorer]]:
    return dict(_REGISTRY)


def scorer_options(cls: type[Scorer]) -> dict[str, Any]:
    """Option name -> default value of a scorer class."""
    sig = inspect.signature(cls.__init__)
    return {
        n: p.default
        for n, p in sig.parameters.items()
        if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }
