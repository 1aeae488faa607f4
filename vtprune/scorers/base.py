"""The scorer interface: a scorer declares the signals it needs and ranks visual tokens.

Adapters compute a signal only when the active scorer asks for it, so a scorer that needs nothing
(random, uniform) costs nothing, and the CLS row or the LLM attention row is recomputed only for the
scorers that read it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vtprune.layout import VisualLayout

# Signal names a scorer may list in `needs`.
VISION_CLS_ATTENTION = "vision_cls_attention"
LLM_ATTENTION = "llm_attention"
HIDDEN_STATES = "hidden_states"
PIXEL_VALUES = "pixel_values"
VISION_FEATURES = "vision_features"
INSTRUCTION = "instruction"
SIGNALS = (VISION_CLS_ATTENTION, LLM_ATTENTION, HIDDEN_STATES, PIXEL_VALUES, VISION_FEATURES, INSTRUCTION)

PRE_LLM = "pre-llm"
IN_LLM = "llm"


@dataclass
class Signals:
    """What a scorer can read. Per-sample lists hold one entry per sample of the batch.

    - ``layout``: where the visual tokens are (`VisualLayout`).
    - ``stage``: ``"pre-llm"`` or ``"llm"``; ``layer``: the decoder layer for ``"llm"``.
    - ``keep``: the per-image budget of the config (for scorers that place tokens themselves).
    - ``vision_cls_attention``: per sample ``[n_b]`` float32, head-mean attention of the vision encoder's
      CLS query to each visual token (0 for tokens the encoder did not produce). On Qwen-VL, whose
      towers have no CLS token: the attention each merged token's 2x2 patch group receives in a
      full-attention block (mean over heads and queries of its image or frame).
    - ``llm_attention``: per sample ``[n_b]`` float32, head-mean attention of the last prompt token at
      decoder layer ``layer`` to each visual token (softmax over all keys).
    - ``hidden_states``: per sample ``[n_b, D]``, visual token states at the pruning point (projected
      image features pre-LLM, layer output in-LLM).
    - ``pixel_values``: the pixel input of the call's image encoding, as the processor gave it (all
      images of the call; LLaVA: ``[images or tiles, 3, H, W]``, Qwen-VL: flattened patches).
    - ``vision_features``: pre-LLM, per sample ``[n_b, C]`` float, each visual token's vision feature as
      it enters the projector (the encoder's feature layer; LLaVA-family models only), so that
      ``projector(vision_features)`` gives the token's embedding.
    - ``instruction`` (pre-LLM): per sample the real text tokens after the sample's last visual token:
      ``instruction_embeds`` ``[T_b, D]`` (LLM input embeddings) and ``instruction_ids`` ``[T_b]`` (None
      where the model was given embeddings only, as in the LLaVA repository).
    - ``stage_index``: for staged in-LLM methods, which of the method's stages is selecting (0 first).
    - ``extras``: method-specific values that a method's own adapter-side stage computed for this prefill
      (``Session.extras``; FlowCut's LLM-stage scores), empty for other methods.
    """

    layout: VisualLayout
    stage: str
    layer: int | None = None
    keep: int | float = 1.0
    vision_cls_attention: list[torch.Tensor] | None = None
    llm_attention: list[torch.Tensor] | None = None
    hidden_states: list[torch.Tensor] | None = None
    pixel_values: torch.Tensor | None = None
    vision_features: list[torch.Tensor] | None = None
    instruction_embeds: list[torch.Tensor] | None = None
    instruction_ids: list[torch.Tensor] | None = None
    stage_index: int = 0
    extras: dict = field(default_factory=dict)

    def require(self, name: str) -> Any:
        value = getattr(self, "instruction_embeds" if name == INSTRUCTION else name)
        if value is None:
            raise RuntimeError(f"signal {name!r} was not provided by the adapter at stage {self.stage!r}")
        return value


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

    def score(self, signals: Signals) -> list[torch.Tensor]:
        """Return per sample a ``[n_b]`` float tensor: higher means keep."""
        raise NotImplementedError

    def needs_signal(self, name: str) -> bool:
        return name in self.needs

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

    def tunable(self, model: Any, adapter: Any) -> dict[str, tuple[Any, Any]]:
        """Options `vtprune tune` may search on this model: name -> ``(vtprune.tune.Param, current value)``.

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
