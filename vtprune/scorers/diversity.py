"""DivPrune: keep the most diverse visual tokens (max-min diversity on the projector outputs)."""

from __future__ import annotations

import torch

from vtprune.scorers.base import HIDDEN_STATES, Scorer, Signals, register
from vtprune.scorers.greedy import max_min_diversity, per_image


@register
class DivPruneScorer(Scorer):
    """DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token Pruning for LMMs").

    Per image, on the visual tokens' states ``Z`` ``[n, D]`` (projector outputs before the LLM, the layer
    output with ``layer=K``), with distance ``1 - cos(Z_i, Z_j)``: the first pick is the token farthest from
    its nearest neighbour, each next one the token farthest from everything picked so far, until the
    image's budget. A selection, not a ranking: scores encode the pick order (see `scorers.greedy`), so
    adaptive budgets are refused. Query-free; no attention.

    Deviation: LLaVA-NeXT newline tokens are kept and never candidates (the reference treats them as
    candidates); the budget is per image (the reference: per prompt).
    """

    name = "divprune"
    description = "DivPrune: max-min diversity of the projected visual tokens (query-free); pre-LLM by default"
    needs = frozenset({HIDDEN_STATES})
    accepts_auto_keep = False

    def __init__(self) -> None:
        pass

    def score(self, signals: Signals) -> list[torch.Tensor]:
        hidden = signals.require(HIDDEN_STATES)
        return per_image(signals.layout, signals.keep, lambda b, idx, k: max_min_diversity(hidden[b][idx.to(hidden[b].device)], k))
