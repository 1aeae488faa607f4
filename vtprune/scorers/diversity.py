"""DivPrune: keep the most diverse visual tokens (max-min diversity on the projector outputs)."""

from __future__ import annotations

import torch

from vtprune.config import ConfigError
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

    On LLaVA-NeXT the image-newline tokens are candidates like any other token, ranked inside the image's
    budget (``newlines="rank"``, the release: its "LLaVA 1.6" branch runs DivPrune on the image's whole
    packed sequence, newline rows included, and counts them in ``img_feature_len``); a budget then counts
    every token of the image, newlines included (``keep=0.098`` keeps ``round(0.098 * n)`` of its ``n``
    tokens; the newline rows are identical, so at most one of them is picked unless nothing else is
    left). ``newlines="keep"`` keeps them beside the budget, as every other method does. Deviation: the
    budget is per image (the reference: per prompt, the same with one image).
    """

    name = "divprune"
    description = "DivPrune: max-min diversity of the projected visual tokens (query-free); pre-LLM by default"
    needs = frozenset({HIDDEN_STATES})
    accepts_auto_keep = False

    def __init__(self, newlines: str = "rank") -> None:
        """Args:
            newlines: ``"rank"`` (the release) or ``"keep"``: whether LLaVA-NeXT's image-newline tokens are
                candidates inside the budget or always kept beside it (no effect on models without them).
        """
        if newlines not in ("rank", "keep"):
            raise ConfigError(f"divprune: newlines must be 'rank' (the release) or 'keep', got {newlines!r}")
        self.newlines = newlines
        self.ranks_fixed = newlines == "rank"

    def score(self, signals: Signals) -> list[torch.Tensor]:
        hidden = signals.require(HIDDEN_STATES)
        return per_image(signals.layout, signals.keep, lambda b, idx, k: max_min_diversity(hidden[b][idx.to(hidden[b].device)], k))
