"""CLS attention of the vision encoder (the VTC-CLS / VisionZip dominant-token criterion)."""

from __future__ import annotations

import torch

from vtprune.scorers.base import PRE_LLM, VISION_CLS_ATTENTION, Scorer, Signals, register


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
        if vision_layer is not None:
            layers = [vision_layer] if isinstance(vision_layer, int) else list(vision_layer)
            if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
                raise ValueError(f"cls: vision_layer must be an int or a non-empty list of ints, got {vision_layer!r}")
        self.vision_layer = vision_layer

    def score(self, signals: Signals) -> list[torch.Tensor]:
        return list(signals.require(VISION_CLS_ATTENTION))
