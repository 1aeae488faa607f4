"""VisPruner: important tokens by the vision encoder's CLS attention, then diverse tokens among the rest.

Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs"
(ICCV 2025); released code github.com/Theia-4869/VisPruner, ``llava/model/llava_arch.py``
(``encode_images``) and ``llava/model/multimodal_encoder/clip_encoder.py`` (``feature_select``).

Per image with budget ``k`` (a float ``keep`` is first converted to a count, see `image_budget`):

1. ``k = T_imp + T_div`` with ``T_imp = int(k * important_ratio)``; ``important_ratio`` defaults to 0.5
   (the release's ``--important_ratio`` default and the ratio of its README examples).
2. Important: the ``T_imp`` tokens of highest head-mean CLS attention of the feature layer (the release
   reads ``attentions[mm_vision_select_layer]``, layer ``-2``, the layer whose output enters the projector).
3. Diverse, by iterative duplicate removal (`remove_duplicates`) among the others, ordered by descending
   CLS attention, on the unit-normalised feature-layer features (``hidden_states[-2]``, before the
   projector): split the remaining list into its even and odd positions, score each even-position token
   by its highest cosine with any odd-position token, drop the ``r = min(8, R - T_div)`` highest, and
   continue on ``[kept even tokens in descending score order, then the odd tokens]`` until ``T_div``
   remain.

A selection (the kept set of ``k`` is not the kept set of ``k + 1`` plus one), so the scores encode the
pick order (`scorers.greedy`) and adaptive budgets are refused.
"""

from __future__ import annotations

from typing import Any

import torch

from vtprune.config import ConfigError
from vtprune.scorers.base import (
    HIDDEN_STATES,
    PRE_LLM,
    VISION_CLS_ATTENTION,
    VISION_FEATURES,
    Scorer,
    Signals,
    register,
)
from vtprune.scorers.greedy import order_scores, per_image
from vtprune.scorers.select import image_budget

IMPORTANT_RATIO = 0.5  # the release's --important_ratio default (llava/eval/model_vqa_loader.py)
REMOVAL_STEP = 8  # tokens dropped per round at most (the release's `r = min(8, R - diverse_token_num)`)


def split_budget(k: int, important_ratio: float = IMPORTANT_RATIO) -> tuple[int, int]:
    """``(T_imp, T_div)`` with ``T_imp = int(k * important_ratio)`` (truncated, as the release) and
    ``T_imp + T_div = k``. Examples: 64 -> (32, 32), 12 -> (6, 6), 1 -> (0, 1)."""
    important = int(k * important_ratio)
    return important, k - important


def remove_duplicates(unit: torch.Tensor, residual: torch.Tensor, target: int,
                      step: int = REMOVAL_STEP) -> torch.Tensor:
    """VisPruner's iterative duplicate removal: ``residual`` shortened to ``target`` tokens.

    Args:
        unit: ``[n, C]`` unit-normalised features (float32).
        residual: ``[R]`` long, rows of ``unit`` in the order the release keeps them (CLS attention,
            descending, before the first round).
        target: tokens to keep (``T_div``).

    Each round: ``a = residual[0::2]``, ``b = residual[1::2]``; ``s_i = max_j cos(a_i, b_j)``; the ``r``
    highest ``s`` leave, and ``residual = [a sorted by descending s, minus the first r; b]``. Sorting is
    stable (ties: the earlier token first); the release's ``argsort`` leaves tie order unspecified. Every
    shape follows from ``R`` and ``target`` on the host: nothing is read from the device. Returns the
    surviving indices ``[target]`` (``[R]`` when ``R <= target``) in their final order. Batched: ``unit``
    ``[B, n, C]`` and ``residual`` ``[B, R]`` give ``[B, target]``.
    """
    single = residual.dim() == 1  # one image; a leading batch dimension runs the images (tiles) at once
    u = unit[None] if single else unit  # [B, n, C]
    res = residual[None] if single else residual  # [B, R]
    width = u.shape[-1]
    while True:
        r = min(step, int(res.shape[1]) - target)
        if r <= 0:
            return res[0] if single else res
        a, b = res[:, 0::2], res[:, 1::2]
        ua = u.gather(1, a[..., None].expand(-1, -1, width))
        ub = u.gather(1, b[..., None].expand(-1, -1, width))
        closest = (ua @ ub.transpose(1, 2)).max(dim=2).values  # [B, ceil(R / 2)]
        # r > len(a) only on tiny images (the release's indexing fails there): every even token leaves
        distinct = torch.sort(closest, dim=1, descending=True, stable=True).indices[:, r:]
        res = torch.cat([a.gather(1, distinct), b], dim=1)


def vispruner_order(attention: torch.Tensor, features: torch.Tensor, k: int,
                    important_ratio: float = IMPORTANT_RATIO) -> torch.Tensor:
    """One image's VisPruner selection, ``[min(k, n)]`` indices in pick order: important tokens first (by
    descending CLS attention), then the diverse tokens.

    Args:
        attention: ``[n]`` CLS attention of the image's candidate tokens.
        features: ``[n, C]`` their features for the similarity (any float dtype).

    A leading batch dimension (``[B, n]``, ``[B, n, C]``: the tiles of an image, as the release's
    ``encode_images`` runs them) gives ``[B, min(k, n)]``, the same picks as one call per row.
    """
    n = int(attention.shape[-1])
    k = min(k, n)
    n_imp, n_div = split_budget(k, important_ratio)
    order = torch.sort(attention.float(), dim=-1, descending=True, stable=True).indices
    if n_div <= 0:
        return order[..., :n_imp]
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    diverse = remove_duplicates(unit, order[..., n_imp:], n_div)
    return torch.cat([order[..., :n_imp], diverse], dim=-1)


@register
class VisPrunerScorer(Scorer):
    """VisPruner: ``T_imp`` important tokens by CLS attention + ``T_div`` diverse tokens by duplicate removal.

    See the module docstring for the algorithm and its source. Pre-LLM only; query-free.

    - LLaVA-1.5 / NeXT: head-mean CLS attention of ``vision_layer`` (default the adapter's feature layer,
      ``-2``, as the release) and the feature-layer vision features before the projector
      (``VISION_FEATURES``), as the release.
    - Qwen2-VL / 2.5-VL / 3-VL (our adaptation; the towers have no CLS token and their pre-merger patch
      features are not one per visual token): importance is the attention received in the last
      full-attention block (vtprune's Qwen ``vision_cls_attention``), and the similarity uses the merger
      outputs (``HIDDEN_STATES``), the visual tokens as the LLM receives them.

    Budget (``budget_per``): ``"tile"`` (the default, the release) runs VisPruner on every tile's whole
    24 x 24 grid with ``keep`` each (the release's ``visual_token_num`` per tile of ``encode_images``;
    `vtprune.scorers.select.select_tiles`) and drops LLaVA-NeXT's image-newline tokens. The release feeds
    its LLM neither newlines nor an unpadded grid (its ``prepare_inputs_labels_for_multimodal`` strips
    ``_unpad`` from ``mm_patch_merge_type``: every crop's picks, padding included, in the padded grid's raster
    order). HF's LLaVA-NeXT sequence holds only the unpadded grid, so the picks that fall in the padding
    have no token here: vtprune keeps the release's picks in the unpadded area, in the release's order, and
    the LLM sees ``tiles x keep`` tokens minus those (deviation, recorded in
    `benchmarks/parity/vispruner_next.py`). On untiled models (LLaVA-1.5) a tile is an image, so both rules
    agree and the per-image path runs. ``"image"``: per image over all its tiles together, after the
    unpadding, newlines kept beside the budget (every other method's rule; Qwen-VL, which has no tiles,
    always uses it). Kept tokens stay in raster order (so does the release, through
    its index mask).

    Options:
        important_ratio: the important share of the budget (0.5, the release's default).
        vision_layer: the ``hidden_states`` index of the CLS-attention layer (None: the feature layer).
        budget_per: ``"tile"`` (the release) or ``"image"``.
    """

    name = "vispruner"
    description = "VisPruner: CLS-attention important tokens + diverse tokens by duplicate removal (1:1), pre-LLM"
    needs = frozenset({VISION_CLS_ATTENTION, VISION_FEATURES})
    stages = (PRE_LLM,)
    default_layer = None
    accepts_auto_keep = False  # a selection of exactly k tokens per image

    def __init__(self, important_ratio: float = IMPORTANT_RATIO, vision_layer: int | None = None,
                 budget_per: str = "tile") -> None:
        if isinstance(important_ratio, bool) or not isinstance(important_ratio, (int, float)) \
                or not 0.0 <= float(important_ratio) <= 1.0:
            raise ConfigError(f"vispruner: important_ratio must be a number in [0, 1], got {important_ratio!r}")
        if vision_layer is not None and (isinstance(vision_layer, bool) or not isinstance(vision_layer, int)):
            raise ConfigError(f"vispruner: vision_layer must be one int (a hidden_states index) or None, "
                              f"got {vision_layer!r}")
        if budget_per not in ("tile", "image"):
            raise ConfigError(f"vispruner: budget_per must be 'tile' (the release) or 'image', got {budget_per!r}")
        self.important_ratio = float(important_ratio)
        self.vision_layer = vision_layer
        self.budget_per = budget_per
        self._features = VISION_FEATURES  # HIDDEN_STATES on Qwen-VL (see `bind`)

    def bind(self, model: Any, adapter: Any) -> None:
        qwen = getattr(adapter, "vision_family", "clip") == "qwen"
        self._features = HIDDEN_STATES if qwen else VISION_FEATURES
        self.per_tile = self.budget_per == "tile" and getattr(adapter, "tiled", False)
        self.drops_fixed = self.per_tile  # the release feeds no newlines

    def needs_signal(self, name: str) -> bool:
        return name in (VISION_CLS_ATTENTION, self._features)

    def tunable(self, model: Any, adapter: Any) -> dict[str, tuple[Any, Any]]:
        from vtprune.tunable import Param

        return {"important_ratio": (Param("float", 0.0, 1.0), self.important_ratio)}

    def score(self, signals: Signals) -> list[torch.Tensor]:
        attention = signals.require(VISION_CLS_ATTENTION)
        features = signals.require(self._features)

        def pick(b: int, idx: torch.Tensor, k: int) -> torch.Tensor:
            feats = features[b][idx.to(features[b].device)]
            att = attention[b][idx.to(attention[b].device)].to(feats.device)
            return vispruner_order(att, feats, k, self.important_ratio)

        return per_image(signals.layout, signals.keep, pick)

    def score_tiles(self, signals: Signals) -> torch.Tensor:
        """``[T, S]`` pick-order scores of every tile's grid (`order_scores`; rows before ``tile_first`` -inf):
        VisPruner on each tile's ``S - tile_first`` rows with the per-tile budget, as the release's
        ``encode_images`` runs on the batch of tiles."""
        attention = signals.tile_cls_attention
        features = signals.tile_features
        if attention is None or features is None:
            raise RuntimeError("vispruner: the per-tile signals were not recorded for this call")
        first = signals.tile_first
        tiles, stride = attention.shape
        k, _ = image_budget(signals.keep, stride - first)
        out = torch.full((tiles, stride), float("-inf"), device=features.device)
        orders = vispruner_order(attention[:, first:].to(features.device), features[:, first:], k,
                                 self.important_ratio)  # [T, k]: all tiles in one pass
        for t in range(tiles):
            out[t, first:] = order_scores(orders[t], stride - first)
        return out
