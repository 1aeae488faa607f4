"""CLS attention of the vision encoder: one layer (``cls``) or VTC-CLS's layer ensemble (``vtc-cls``)."""

from __future__ import annotations

from typing import Any

import torch

from vtprune.config import ConfigError
from vtprune.scorers.base import PRE_LLM, VISION_CLS_ATTENTION, Scorer, Signals, register


def _check_layers(name: str, vision_layer: Any) -> None:
    if vision_layer is None:
        return
    layers = [vision_layer] if isinstance(vision_layer, int) else list(vision_layer)
    if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise ValueError(f"{name}: vision_layer must be an int or a non-empty list of ints, got {vision_layer!r}")


@register
class CLSScorer(Scorer):
    """s_j = sum over the chosen vision layers of the head-mean attention of the CLS query to patch j.

    Options:
        vision_layer: int or list of ints, vision-encoder layer indices (negative counts from the end,
            as in ``hidden_states``: ``-2`` is the layer whose output LLaVA feeds to the projector, the
            default). A list sums the head-mean rows (VTC-CLS's multi-layer ensemble).
    """

    name = "cls"
    description = "CLS attention of the vision encoder (VTC-CLS/VisionZip criterion), pre-LLM"
    needs = frozenset({VISION_CLS_ATTENTION})
    stages = (PRE_LLM,)
    default_layer = None

    def __init__(self, vision_layer: int | list[int] | None = None) -> None:
        _check_layers(self.name, vision_layer)
        self.vision_layer = vision_layer

    def score(self, signals: Signals) -> list[torch.Tensor]:
        return signals.padded(VISION_CLS_ATTENTION)  # [B, N_max], -inf on padding

    def tunable(self, model: Any, adapter: Any) -> dict[str, tuple[Any, Any]]:
        from vtprune.tunable import Param

        candidates = vision_layer_candidates(adapter)
        current = self.vision_layer if self.vision_layer is not None else int(adapter.default_vision_layer())
        if isinstance(current, int) and current < 0:
            current += adapter.vision_depth() + 1
        if not isinstance(current, int) or current not in candidates:
            return {}
        return {"vision_layer": (Param("choice", choices=tuple(candidates)), current)}


def vision_layer_candidates(adapter: Any) -> list[int]:
    """``hidden_states`` indices a CLS-type score may come from: every layer up to the feature layer (CLIP),
    the full-attention blocks (Qwen-VL)."""
    if hasattr(adapter, "full_attention_blocks"):
        return [b + 1 for b in adapter.full_attention_blocks()]
    feature = int(adapter.default_vision_layer())
    if feature < 0:
        feature += adapter.vision_depth() + 1
    return list(range(1, feature + 1))


def ensemble_layers(model: Any, adapter: Any, n_layers: int) -> list[int]:
    """VTC-CLS's default layers: the last ``n_layers`` full-attention vision layers ending at the feature layer.

    Returned as ``hidden_states`` indices (layer ``i``, 0-based, has index ``i + 1``), ascending. The
    feature layer is ``adapter.default_vision_layer()`` (LLaVA: ``-2``, the layer whose output enters the
    projector; Qwen-VL: the last full-attention block). Towers with window attention (Qwen2.5-VL) offer
    only their ``adapter.full_attention_blocks()``. Examples: CLIP ViT-L/14 (24 layers) gives 17..23
    (0-based layers 16..22); a 3-layer toy tower gives [1, 2]; Qwen2.5-VL-7B gives its four full-attention
    blocks [8, 16, 24, 32]; Qwen2-VL-7B (32 blocks) gives 26..32.
    """
    feature = int(adapter.default_vision_layer())
    if feature < 0:
        feature += adapter.vision_depth() + 1
    if hasattr(adapter, "full_attention_blocks"):
        candidates = [b + 1 for b in adapter.full_attention_blocks() if b + 1 <= feature]
    else:
        candidates = list(range(1, feature + 1))
    if not candidates:
        raise ConfigError(f"vtc-cls found no vision layer up to the feature layer {feature}; pass vision_layer=[...]")
    return candidates[-n_layers:]


@register
class VTCCLSScorer(CLSScorer):
    """VTC-CLS (Wang et al., 2024): CLS attention summed over a range of vision layers (a layer ensemble).

    s_j = sum over layers l of (1/H) sum_h A_l[h, CLS, j]: the sum of head-mean CLS rows, here per visual
    token ``[n_b]``. The top ``keep`` tokens per image are kept in raster order, before the LLM.

    Default layers (resolved from the model by `bind`, see `ensemble_layers`): the ``n_layers`` layers
    ending at the feature layer. LLaVA-1.5 / NeXT: 0-based CLIP layers 16..22 (hidden_states 17..23),
    clipped to the tower's depth. Qwen-VL (no CLS token): the attention received in full-attention blocks,
    pooled per 2x2 merge group, summed over blocks: every full-attention block of Qwen2.5-VL (4 in the
    7B model), the last ``n_layers`` blocks of Qwen2-VL and Qwen3-VL.

    Options:
        vision_layer: explicit ``hidden_states`` indices (int or list, negative from the end); overrides
            the default range.
        n_layers: size of the default range (7 = VTC-CLS's ``--layer 16`` on a 24-layer CLIP).

    ``vision_layer`` reads the resolved layers after `bind` (the adapter hooks those).
    """

    name = "vtc-cls"
    description = "VTC-CLS: CLS attention summed over the 7 vision layers ending at the feature layer, pre-LLM"

    def __init__(self, vision_layer: int | list[int] | None = None, n_layers: int = 7) -> None:
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
        self.n_layers = n_layers
        self._resolved: list[int] | None = None
        super().__init__(vision_layer)

    @property
    def vision_layer(self) -> int | list[int] | None:
        return self._resolved if self._resolved is not None else self._requested

    @vision_layer.setter
    def vision_layer(self, value: int | list[int] | None) -> None:
        self._requested = value
        self._resolved = None

    def tunable(self, model: Any, adapter: Any) -> dict[str, tuple[Any, Any]]:
        from vtprune.tunable import Param

        if self._requested is not None:  # explicit layers: nothing to search
            return {}
        top = len(ensemble_layers(model, adapter, 10_000))
        return {"n_layers": (Param("int", 1, top), min(self.n_layers, top))} if top > 1 else {}

    def bind(self, model: Any, adapter: Any) -> None:
        self._resolved = None
        if self._requested is None:
            self._resolved = ensemble_layers(model, adapter, self.n_layers)
