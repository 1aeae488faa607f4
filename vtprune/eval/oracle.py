"""``oracle``: an eval-only pruning method for the toy tasks that keeps the cells the question is about.

It knows each sample's answer cells (`vtprune.eval.tasks.EvalSample.question_cells`), so it gives the upper
bound of a selection before the LLM: with the question's objects kept, a model that still fails is
brittle with few tokens, not badly served. Scores per visual token: 2 on the question's object cells,
1 on the other objects' cells, 0 on background (ties: the earlier token), so at a budget below the
question's cells it keeps as many of them as fit, and above it adds the other objects, then background.

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
            question, objects = set(sample.question_cells or []), set(sample.object_cells or [])
            score = torch.tensor([2.0 if c in question else 1.0 if c in objects else 0.0 for c in under])
            score = score - torch.arange(n) / (4.0 * n)  # ties: the earlier token
            out.append(score.to(lay.positions[b].device))
        return out


EVAL_ONLY: dict[str, Callable[..., Scorer]] = {"oracle": OracleScorer}  # name -> factory(samples, **options)
