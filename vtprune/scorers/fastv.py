"""FastV: rank visual tokens by the attention the last prompt token pays them at an LLM layer."""

from __future__ import annotations

import torch

from vtprune.scorers.base import IN_LLM, LLM_ATTENTION, Scorer, Signals, register


@register
class FastVScorer(Scorer):
    """s_j = mean over heads of softmax(q_last . K^T / sqrt(d))[j] at decoder layer ``layer``.

    The attention row is recomputed from the layer input (one query row, all keys), so the model keeps
    running under SDPA. Kept tokens keep their original positions. ``layer=2`` here prunes before
    decoder layer 3, i.e. the release's K=3 (its K names the first layer that sees fewer tokens), the value
    its lmms-eval variant (``lmms-eval/fastv_kvcache.py``) hard-codes; the paper's headline K=2, also the
    setting of its released evaluation scripts, is ``layer=1`` (benchmarks/parity/fastv.py compares both).
    """

    name = "fastv"
    description = "FastV: last-prompt-token attention at LLM layer K (in-LLM, default layer=2)"
    needs = frozenset({LLM_ATTENTION})
    stages = (IN_LLM,)
    default_layer = 2
    # attention-bias's patches/FastV.patch: weight.npy (the cubic, every task), pad mask threshold 0.5, rank lowered
    debias_release = {"trend": "cubic:3.015e-3,-1.460e-5,2.569e-8", "pad_theta": 0.5, "pad_mode": "exclude",
                      "source": "FastV cubic"}

    def __init__(self) -> None:
        pass

    def score(self, signals: Signals) -> torch.Tensor:
        """``[B, N_max]`` (one batched tensor; ``-inf`` on padding)."""
        return signals.padded(LLM_ATTENTION)
