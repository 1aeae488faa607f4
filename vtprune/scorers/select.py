"""Turn scores into kept indices under a per-image budget."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from vtprune.config import AutoKeep, auto_keep
from vtprune.layout import VisualLayout
from vtprune.signals import Scores, pad_per_sample


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


def warn_clamped(keep: Any, clamped: list[int]) -> None:
    """Warn, for a selection's caller, that a count ``keep`` covered every prunable token of the images whose
    sizes ``clamped`` lists (those images are kept whole); nothing when the list is empty."""
    if clamped:
        warnings.warn(
            f"vtprune: keep={keep} exceeds the prunable visual tokens of {len(clamped)} image(s) "
            f"(smallest has {min(clamped)}); all their tokens are kept",
            stacklevel=4,
        )


@dataclass
class Selection:
    """The visual tokens a batch keeps, as one batched result (device tensors, host counts).

    - ``layout``: the `VisualLayout` the selection indexes.
    - ``mask``: ``[B, N_max]`` bool (device) over the padded visual tokens (`VisualLayout.padded`), True
      on kept ones.
    - ``counts``: kept visual tokens per sample (host ints, known before any device read).
    - ``per_image``: per sample, the kept count of each image (host ints).
    - ``scores``: the ``[B, N_max]`` float32 scores the selection ranked (None where none were used).
    """

    layout: VisualLayout
    mask: torch.Tensor
    counts: list[int]
    per_image: list[list[int]]
    scores: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return max(self.counts, default=0)

    @property
    def indices(self) -> torch.Tensor:
        """``[B, K_max]`` long: per sample its kept visual indices in increasing order (row ``b`` valid up to
        ``counts[b]``; the rest hold indices of dropped or padding slots)."""
        m = self.mask
        n = m.shape[1]
        key = torch.where(m, torch.arange(n, device=m.device), n + torch.arange(n, device=m.device))
        return torch.sort(key, dim=1).indices[:, : self.width]

    def kept(self) -> list[torch.Tensor]:
        """Per sample ``[k_b]`` sorted kept indices into its visual tokens (views of `indices`)."""
        idx = self.indices
        return [idx[b, :k] for b, k in enumerate(self.counts)]

    @staticmethod
    def from_kept(layout: VisualLayout, kept: list[torch.Tensor], scores: torch.Tensor | None = None,
                  per_image: list[list[int]] | None = None) -> Selection:
        """A selection from per-sample kept index lists (methods that select themselves). ``per_image``: the
        kept count of each image per sample, when the method knows it on the host; otherwise it is read
        from the device (one read)."""
        pad = layout.padded
        dev = pad.positions.device
        mask = torch.zeros(layout.batch_size, pad.width, dtype=torch.bool, device=dev)
        for b, k in enumerate(kept):
            mask[b, k.to(dev)] = True
        if per_image is None:
            per_image = [layout.kept_per_image(b, k) for b, k in enumerate(kept)]
        return Selection(layout, mask, [int(k.numel()) for k in kept], per_image, scores)




def pad_scores(scores: Scores, layout: VisualLayout) -> torch.Tensor:
    """A scorer's result as ``[B, N_max]`` float32 on the layout's device (``-inf`` on padding)."""
    if isinstance(scores, torch.Tensor):
        pad = layout.padded
        if tuple(scores.shape) != (layout.batch_size, pad.width):
            raise ValueError(f"scorer returned padded scores of shape {tuple(scores.shape)}, expected "
                             f"{(layout.batch_size, pad.width)} (batch, most visual tokens of a sample)")
        return scores.to(pad.positions.device, torch.float32)
    return pad_per_sample(scores, layout)


def select(scores: Scores, layout: VisualLayout, keep: int | float | str | StageBudget,
           excludes: bool = True) -> Selection:
    """Keep the ``keep`` best prunable tokens of every image plus every non-prunable token, batched.

    One stable descending sort over a padded ``[images, P_max]`` candidate matrix: ties go to the earlier
    token, as a per-image sort would. Budgets come from the host-known candidate counts, so a fixed
    budget reads no device memory.

    Args:
        scores: per sample ``[n_b]`` scores (higher = keep), or one padded ``[B, N_max]`` tensor.
        keep: per-image budget (see `image_budget`), or adaptive (``"auto:0.95"``, `mass_budget`).
        excludes: whether the scorer may return ``-inf`` for tokens it excludes (`Scorer.excludes`): the
            image then keeps at most its finite-scored tokens (at least one), which needs one host read
            of the finite counts. Adaptive budgets read the scores once as well.
    """
    pad = layout.padded
    s = pad_scores(scores, layout)
    bsz, width = s.shape
    flat = torch.cat([s.reshape(-1), s.new_full((1,), float("-inf"))])  # the dummy slot bsz * width
    cand = flat[pad.candidates]  # [I, P_max]
    cand = cand.masked_fill(~pad.candidate_valid, float("-inf"))
    n_cand = pad.n_candidates
    adaptive = auto_keep(keep)
    clamped = []
    if adaptive is not None:
        host = cand.cpu()  # one read: the budgets depend on the score distribution
        budgets = []
        for i, n in enumerate(n_cand):
            v = host[i, :n]
            fin = v[v > float("-inf")]
            budgets.append(mass_budget(fin if fin.numel() else v[:1].nan_to_num(0.0), adaptive) if n else 0)
    else:
        budgets = []
        for n in n_cand:
            k, was_clamped = image_budget(keep, n)
            budgets.append(k)
            if was_clamped:
                clamped.append(n)
        if excludes and n_cand:
            finite = (cand > float("-inf")).sum(1).cpu().tolist()  # one read for the whole batch
            budgets = [min(k, max(f, 1)) if n else 0 for k, f, n in zip(budgets, finite, n_cand)]
    k_max = max(budgets, default=0)
    mask = torch.zeros(bsz * width + 1, dtype=torch.bool, device=s.device)
    if pad.fixed.numel():
        mask[pad.fixed] = True
    if k_max:
        order = torch.sort(cand, dim=1, descending=True, stable=True).indices[:, :k_max]
        picked = pad.candidates.gather(1, order)
        if any(k != k_max for k in budgets):
            rank_ok = torch.arange(k_max)[None] < torch.tensor(budgets)[:, None]
            picked = picked.masked_fill(~rank_ok.to(s.device, non_blocking=True), bsz * width)
        mask[picked.reshape(-1)] = True
    mask = mask[: bsz * width].view(bsz, width)
    per_image: list[list[int]] = [[] for _ in range(bsz)]
    counts = [0] * bsz
    i = 0
    for b, spans in enumerate(layout.spans):
        for sp in spans:
            k = budgets[i] + (sp.length - sp.n_candidates)
            per_image[b].append(k)
            counts[b] += k
            i += 1
    warn_clamped(keep, clamped)
    return Selection(layout, mask, counts, per_image, s)


def select_tiles(tile_scores: torch.Tensor, layout: VisualLayout, keep: int | float | StageBudget,
                 first: int = 1, keep_fixed: bool = True) -> Selection:
    """Keep the ``keep`` best rows of every tile's whole encoder grid, then every visual token whose source
    row was kept, plus (``keep_fixed``) every never-pruned token (LLaVA-NeXT newlines): the per-tile
    selection of VisPruner's and CDPruner's NeXT releases, which select on each tile's whole grid. Picks
    that fall in the grid's padding have no token in the unpadded sequence, so such a tile keeps fewer
    than ``keep``.

    Args:
        tile_scores: ``[T, S]`` float scores (higher = keep) of all tiles of the call, rows as
            `VisualLayout.source` indexes them once flattened (``tile * S + row``).
        keep: per-tile budget over its ``S - first`` candidate rows (see `image_budget`).
        first: the first candidate row of a tile (1: the CLS row is no visual token).
        keep_fixed: keep the never-pruned tokens (False: drop them, as releases that feed no newlines).
            A budget covering the tile keeps them either way: keep-all is the unpatched model.

    The kept counts depend on where the picks fall: one host read of the per-image counts.
    """
    tiles, stride = tile_scores.shape
    n = stride - first
    k, _ = image_budget(keep, n)
    keep_fixed = keep_fixed or k >= n
    dev = tile_scores.device
    rows = torch.zeros(tiles, stride, dtype=torch.bool, device=dev)
    if k:
        order = torch.sort(tile_scores[:, first:].float(), dim=1, descending=True, stable=True).indices[:, :k]
        rows[:, first:].scatter_(1, order, True)
    pad = layout.padded
    flat = rows.reshape(-1)
    src = pad.source.to(dev)
    mask = (src >= 0) & flat[src.clamp(min=0)] & pad.valid.to(dev)
    if pad.fixed.numel():
        mask.view(-1)[pad.fixed.to(dev)] = keep_fixed
    host = mask.cpu()  # the one read: how many tokens each image keeps
    per_image = [layout.kept_per_image(b, torch.nonzero(host[b, :n]).flatten())
                 for b, n in enumerate(layout.counts())]
    return Selection(layout, mask.to(pad.positions.device), [sum(c) for c in per_image], per_image)


def select_topk(scores: list[torch.Tensor], layout: VisualLayout, keep: int | float | str,
                excludes: bool = True) -> list[torch.Tensor]:
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
        Ties are broken towards the earlier token, so the selection is deterministic. (`select` returns
        the same as one batched `Selection`.)
    """
    return select(scores, layout, keep, excludes).kept()
