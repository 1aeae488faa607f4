"""Turn scores into kept indices under a per-image budget."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from vtprune.config import AutoKeep, auto_keep
from vtprune.layout import VisualLayout


def mass_budget(scores: torch.Tensor, spec: AutoKeep) -> int:
    """The fewest top tokens whose normalised score mass reaches ``spec.mass``, bounded by min / max.

    ``scores`` ``[n]`` finite. Mass weights are the scores themselves when none is negative (attention
    probabilities, CLS rows), else the scores shifted by their minimum; all-equal weights count as
    uniform (so the mass share is the token share).
    """
    n = int(scores.numel())
    if n == 0:
        return 0
    w = scores.double()
    if bool((w < 0).any()):
        w = w - w.min()
    total = float(w.sum())
    if total <= 0:
        k = math.ceil(spec.mass * n - 1e-6)
    else:
        cum = torch.cumsum(torch.sort(w, descending=True).values, 0) / total
        k = int(torch.searchsorted(cum, torch.tensor(spec.mass - 1e-6, dtype=cum.dtype))) + 1  # float32 slack
    k = max(k, spec.min)
    if spec.max is not None:
        k = min(k, spec.max)
    return max(1, min(n, k))


@dataclass(frozen=True)
class StageBudget:
    """An intermediate stage's budget in staged pruning: ``fraction`` of the tokens present, but never fewer
    than ``at_least`` (the final count, so that a later stage is not starved and keep-all stays keep-all)."""

    fraction: float
    at_least: int = 1


def image_budget(keep: int | float | StageBudget, n_prunable: int) -> tuple[int, bool]:
    """Tokens to keep for one image with ``n_prunable`` prunable tokens.

    An int is a count, clamped to ``n_prunable`` (the bool says whether it was clamped); a float is a
    fraction, rounded to the nearest count and at least 1; a `StageBudget` the larger of its fraction's
    count and its floor.
    """
    if n_prunable == 0:
        return 0, False
    if isinstance(keep, StageBudget):
        k = max(int(round(keep.fraction * n_prunable)), keep.at_least, 1)
        return min(k, n_prunable), False
    if isinstance(keep, float):
        return max(1, min(n_prunable, int(round(keep * n_prunable)))), False
    return min(keep, n_prunable), keep > n_prunable


def select_topk(scores: list[torch.Tensor], layout: VisualLayout, keep: int | float | str) -> list[torch.Tensor]:
    """Per sample, keep the ``keep`` best prunable tokens of every image plus every non-prunable token.

    A score of ``-inf`` excludes a token: the image then keeps at most its finite-scored tokens (at least
    one token per image is always kept).

    Args:
        scores: per sample ``[n_b]`` scores (higher = keep).
        layout: the batch's `VisualLayout`.
        keep: per-image budget (see `image_budget`), or an adaptive one (``"auto:0.95"``, `mass_budget`:
            chosen per image from that image's finite scores).

    Returns:
        Per sample a sorted ``[k_b]`` LongTensor of indices into that sample's visual tokens.
        Ties are broken towards the earlier token, so the selection is deterministic.
    """
    kept: list[torch.Tensor] = []
    clamped = []
    adaptive = auto_keep(keep)
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
            if adaptive is None:
                k, was_clamped = image_budget(keep, int(cand.numel()))
                if was_clamped:
                    clamped.append(int(cand.numel()))
            allowed = s[cand] > float("-inf")  # -inf: excluded by the scorer; the budget shrinks
            if not bool(allowed.all()):
                cand = cand[allowed] if bool(allowed.any()) else cand[:1]
                if adaptive is None:
                    k = min(k, int(cand.numel()))
            if adaptive is not None:
                k = mass_budget(s[cand], adaptive)
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
