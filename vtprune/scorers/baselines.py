"""Baselines that need no signal: random tokens and a spatially even subsample of the patch grid."""

from __future__ import annotations

import math

import torch

from vtprune.config import check_seed
from vtprune.scorers.base import Scorer, Signals, register
from vtprune.scorers.select import image_budget


@register
class RandomScorer(Scorer):
    """Uniformly random scores (seeded, so a run is reproducible).

    Options:
        seed: generator seed; the same seed and inputs give the same selection.
    """

    name = "random"
    description = "Random tokens (seeded baseline); pre-LLM by default, in-LLM with layer=K"

    def __init__(self, seed: int = 0) -> None:
        self.seed = check_seed(seed, "random")

    def score(self, signals: Signals) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        return [torch.rand(int(p.numel()), generator=gen) for p in signals.layout.positions]


def lattice(rows: int, cols: int, k: int) -> torch.Tensor:
    """``[k]`` raster indices of a near-square lattice of ``k`` cells spread evenly over a rows x cols grid."""
    if k >= rows * cols:
        return torch.arange(rows * cols)
    gr = max(1, min(rows, round(math.sqrt(k * rows / cols))))
    gc = max(1, min(cols, math.ceil(k / gr)))
    while gr * gc < k:  # the rounding above can fall short on thin grids
        gr = min(rows, gr + 1)
        gc = min(cols, math.ceil(k / gr))
    r = ((torch.arange(gr) + 0.5) * rows / gr).long()
    c = ((torch.arange(gc) + 0.5) * cols / gc).long()
    cells = (r[:, None] * cols + c[None, :]).flatten()
    if cells.numel() > k:  # thin out evenly in raster order
        pick = ((torch.arange(k) + 0.5) * cells.numel() / k).long()
        cells = cells[pick]
    return cells


@register
class UniformScorer(Scorer):
    """Spatially even subsample: a lattice over each image's patch grid gets score 1, the rest 0.

    With several grids per image (LLaVA-NeXT: base image and high-resolution grid) the budget is split
    in proportion to their sizes.
    """

    accepts_auto_keep = False  # places a fixed number of tokens itself
    name = "uniform"
    description = "Spatially even subsample of the patch grid (baseline); pre-LLM by default"

    def __init__(self) -> None:
        pass

    def score(self, signals: Signals) -> list[torch.Tensor]:
        lay = signals.layout
        out = []
        for b in range(lay.batch_size):
            s = torch.zeros(int(lay.positions[b].numel()))
            for idx in lay.image_slices(b):
                idx = idx[lay.prunable[b][idx]]
                k_img, _ = image_budget(signals.keep, int(idx.numel()))
                coords = lay.coords[b][idx]
                segments = torch.unique(coords[:, 0])
                sizes = [int((coords[:, 0] == g).sum()) for g in segments]
                total = sum(sizes)
                alloc = [k_img * n // total for n in sizes]
                for i in sorted(range(len(sizes)), key=lambda i: -sizes[i])[: k_img - sum(alloc)]:
                    alloc[i] += 1
                for g, k_seg in zip(segments, alloc):
                    seg = idx[coords[:, 0] == g]
                    rc = lay.coords[b][seg, 1:]
                    rows, cols = int(rc[:, 0].max()) + 1, int(rc[:, 1].max()) + 1
                    cell = rc[:, 0] * cols + rc[:, 1]
                    chosen = torch.isin(cell, lattice(rows, cols, k_seg))
                    s[seg[chosen]] = 1.0
            out.append(s)
        return out
