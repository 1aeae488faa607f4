"""``oracle``: an eval-only pruning method for the toy tasks that keeps the cells the question is about.

It knows each sample's answer cells (`vtprune.eval.tasks.EvalSample.question_objects`), so it gives the upper
bound of a selection before the LLM: with the question's objects kept, a model that still fails is
brittle with few tokens, not badly served. Tiers per visual token: the question's object cells, then
the other objects' cells, then background (score 2, 1, 0), so at a budget below the question's cells it
keeps as many of them as fit, and above it adds the other objects, then background.

Within a tier it covers objects before it completes them (``question_objects`` / ``scene_objects``, each
object's cells in raster order): first one cell of every object, then a second cell of every big one,
and so on; ties, the earlier token. A count question about four big objects has 16 question cells; at 7
tokens raster order would keep all four cells of the first object and none of the last, and the answer
needs every object seen once.

Not a preset (no real task knows its answer cells): `vtprune eval --method oracle` builds it for each
batch from the batch's samples (`EVAL_ONLY`), on toy tasks only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vtprune.config import ConfigError
from vtprune.eval.recall import token_cells
from vtprune.scorers.base import PRE_LLM, Scorer, Signals


class OracleScorer(Scorer):
    """Scores from the samples' known cells; row ``b`` of the batch is ``samples[b]``."""

    name = "oracle"
    description = "eval-only: keeps the question's object cells (toy tasks; an upper bound)"
    stages = (PRE_LLM,)
    accepts_auto_keep = False

    def __init__(self, samples: list[Any]) -> None:
        self.samples = list(samples)

    def score(self, signals: Signals) -> list[torch.Tensor]:
        lay = signals.layout
        if lay.batch_size != len(self.samples):
            raise ConfigError(f"oracle: the batch has {lay.batch_size} rows but {len(self.samples)} samples "
                              "(it runs inside `vtprune eval` only, without beams or multiple return sequences)")
        out = []
        for b, sample in enumerate(self.samples):
            n = int(lay.positions[b].numel())
            under = token_cells(n, sample.cell_grid) if sample.cell_grid else None
            if under is None:
                raise ConfigError(f"oracle: sample {sample.index} has {n} visual tokens, not one square raster of "
                                  "its task's cells; the oracle runs on the toy tasks with one image per prompt")
            rank = {c: 1.0 + _object_round(c, sample.scene_objects or []) for c in sample.object_cells or []}
            rank.update({c: 2.0 + _object_round(c, sample.question_objects or [])
                         for c in sample.question_cells or []})
            score = torch.tensor([rank.get(c, 0.0) for c in under])
            score = score - torch.arange(n) / (8.0 * n)  # ties: the earlier token
            out.append(score.to(lay.positions[b].device))
        return out


def _object_round(cell: tuple[int, int], objects: list[list[tuple[int, int]]]) -> float:
    """A bonus in ``[0, 0.5]`` within a tier: 0.5 for each object's first cell, less for its later ones
    (``0.5 - k / 8`` for the ``k``-th, an object has at most 4); a cell of several objects takes its earliest."""
    k = min(obj.index(cell) for obj in objects if cell in obj)
    return 0.5 - k / 8.0


EVAL_ONLY: dict[str, Callable[..., Scorer]] = {"oracle": OracleScorer}  # name -> factory(samples, **options)
