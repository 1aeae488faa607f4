"""Turn scores into kept indices under a per-image budget."""

from __future__ import annotations

import warnings

import torch

from vtprune.layout import VisualLayout


def image_budget(keep: int | float, n_prunable: int) -> tuple[int, bool]:
    """Tokens to keep for one image with ``n_prunable`` prunable tokens.

    An int is a count, clamped to ``n_prunable`` (the bool says whether it was clamped); a float is a
    fraction, rounded to the nearest count and at least 1.
    """
    if n_prunable == 0:
        return 0, False
    if isinstance(keep, float):
        return max(1, min(n_prunable, int(round(keep * n_prunable)))), False
    return min(keep, n_prunable), keep > n_prunable


def select_topk(scores: list[torch.Tensor], layout: VisualLayout, keep: int | float) -> list[torch.Tensor]:
    """Per sample, keep the ``keep`` best prunable tokens of every image plus every non-prunable token.

    A score of ``-inf`` excludes a token: the image then keeps at most its finite-scored tokens (at least
    one token per image is always kept).

    Args:
        scores: per sample ``[n_b]`` scores (higher = keep).
        layout: the batch's `VisualLayout`.
        keep: per-image budget (see `image_budget`).

    Returns:
        Per sample a sorted ``[k_b]`` LongTensor of indices into that sample's visual tokens.
        Ties are broken towards the earlier token, so the selection is deterministic.
    """
    kept: list[torch.Tensor] = []
    clamped = []
    for b in range(layout.batch_size):
        s = scores[b].float()
        if s.shape != layout.positions[b].shape:
            raise ValueError(
                f"scorer returned {tuple(s.shape)} scores for sample {b}, expected {tuple(layout.positions[b].shape)}"
            )
        parts = []
        for idx in layout.image_slices(b):
            prunable = layout.prunable[b][idx]
            cand = idx[prunable]
            k, was_clamped = image_budget(keep, int(cand.numel()))
            if was_clamped:
                clamped.append(int(cand.numel()))
            allowed = s[cand] > float("-inf")  # -inf: excluded by the scorer; the budget shrinks
            if not bool(allowed.all()):
                cand = cand[allowed] if bool(allowed.any()) else cand[:1]
                k = min(k, int(cand.numel()))
            if k < cand.numel():
                # stable descending sort: equal scores keep sequence order
                order = torch.sort(s[cand], descending=True, stable=True).indices[:k]
                cand = cand[order]
            parts.append(cand)
            parts.append(idx[~prunable])
        kept.append(torch.sort(torch.cat(parts)).values if parts else torch.zeros(0, dtype=torch.long))
    if clamped:
        warnings.warn(
            f"vtprune: keep={keep} exceeds the prunable visual tokens of {len(clamped)} image(s) "
            f"(smallest has {min(clamped)}); all their tokens are kept",
            stacklevel=3,
        )
    return kept
