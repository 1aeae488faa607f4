"""Relevant-token recall: which of the cells a question is about did a pruning keep (no LLM involved).

On the toy tasks each image is a ``grid x grid`` lattice of 28 px cells, and a sample knows the cells of
the objects its question is about (`vtprune.toy.shapes.Sample.cells`). A method's kept visual tokens
(indices into the sample's visual tokens, raster order) cover a cell when they include at least one of
the cell's tokens. Recall = covered cells / cells. It tells a bad selection (low recall) from a model
that is brittle with few tokens (high recall, low accuracy).
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def token_cells(n_visual: int, grid: int) -> list[tuple[int, int]] | None:
    """``(row, col)`` of the cell under each of ``n_visual`` visual tokens laid out as one square raster
    of side ``g`` (``g`` a multiple of ``grid``: ``g / grid`` tokens a side per cell), or None when the
    tokens are not such a raster (several tiles, newline tokens, another aspect ratio)."""
    g = math.isqrt(n_visual)
    if g * g != n_visual or g % grid:
        return None
    per = g // grid
    return [((i // g) // per, (i % g) // per) for i in range(n_visual)]


def cell_recall(kept: Iterable[int], n_visual: int, cells: list[tuple[int, int]], grid: int) -> float | None:
    """The share of ``cells`` (``(row, col)`` on the ``grid x grid`` lattice) that the ``kept`` visual-token
    indices cover; None when there are no cells to recall or the tokens are not one square raster."""
    if not cells:
        return None
    under = token_cells(n_visual, grid)
    if under is None:
        return None
    covered = {under[i] for i in kept if 0 <= i < n_visual}
    return sum(c in covered for c in cells) / len(cells)
