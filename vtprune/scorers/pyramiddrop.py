"""PyramidDrop: staged in-LLM drops ranked by the last instruction token's attention at each stage."""

from __future__ import annotations

from typing import Any

import torch

from vtprune.scorers.base import IN_LLM, Scorer, Signals, register
from vtprune.scorers.staged import StagedLayers

ATTENTION = "pyramiddrop_attention"  # Signals.extras key: [B, N_max] the stage's scores (-inf on padding)


@register
class PyramidDropScorer(StagedLayers, Scorer):
    """PyramidDrop (Xing et al., CVPR 2025, "PyramidDrop: Accelerating Your Large Vision-Language Models via
    Pyramid Visual Redundancy Reduction"; release github.com/Cooperx521/PyramidDrop, read at 6444f30).

    - Stages: the release's ``layer_list [8, 16, 24]`` names the layers *before which* it ranks and drops
      (``rank_layer = layer_idx + 1`` in ``pdrop_forward``, llava/model/modeling_llama_pdrop.py): the output
      of 0-based layer 7 is pruned before layer 8 runs. Here ``layers`` name the layer whose output is
      pruned, so the release is ``layers=[7, 15, 23]`` (default on 32-layer LLMs; other depths keep the
      fractions, `depth_scaled`: 0, 1, 2 on the 4-layer toys, 6, 13, 20 on 28 layers).
    - Score at a stage after layer l: the head-mean attention of the last instruction token (the last
      prompt token, ``prompt_len + image_tokens - 1`` in ``pdrop_rank_drop``) to each visual token, with
      layer l + 1's ``input_layernorm``, ``q_proj`` / ``k_proj`` and RoPE applied to layer l's output (the
      release recomputes it in the drop layer ``self.layers[rank_layer]`` on that layer's input), softmax
      over all causal keys, then the image columns. The stage keeps the top tokens of each image.
    - Budgets: the release's ``image_token_ratio_list [0.5, 0.25, 0.125]`` (with 1.0 prepended) keeps
      ``int(N * ratio)`` of an image's N tokens after each stage: lambda = 0.5, 576 -> 288 -> 144 -> 72.
      Here the stages before the last keep ``ratios`` of each image's original tokens (default 0.5, 0.25:
      lambda, lambda^2) and the last keeps ``keep``: the release's setting is ``keep=72`` (or
      ``keep=0.125``, lambda^3). Another lambda with S stages: ``ratios=[lambda, ..., lambda^(S-1)]``,
      ``keep=lambda^S``. For small budgets the authors advise a shallow first stage (issue #29: their
      ``layer_list [2, 8, 16]`` with lambda 0.19, 64 tokens on average over 32 layers), here
      ``layers=[1, 7, 15], ratios=[0.19, 0.0361], keep=4``.

    Deviations: kept tokens keep their original positions (the release re-indexes them contiguously, so
    its later stages also rank with re-indexed RoPE positions); budgets round (``round(N * ratio)``)
    where the release floors; the budget is per image (the release: per sample, all its image tokens);
    depths other than 32 get the layers' depth fractions (the release's scripts pass [8, 16, 24]
    unchanged to the 40-layer 13B: ``layers=[7, 15, 23]`` there). Explicit ``layers=[...]`` are used as
    given.
    """

    name = "pyramiddrop"
    description = "PyramidDrop: last-instruction-token attention, staged drops in the LLM (lambda 0.5)"
    stages = (IN_LLM,)
    # attention-bias's patches/PyramidDrop.patch, first stage only: its GQA weight file (exp, lambda 3.99e-3 per
    # index; MME 3.27e-3, ...), generate_pad_mask(threshold=0.01) multiplied in (budget unchanged)
    debias_release = {"trend": "exp:3.99e-3", "pad_theta": 0.01, "pad_mode": "zero",
                      "source": "PyramidDrop GQA exponential"}

    PAPER_LAYERS = (7, 15, 23)  # 0-based, pruned outputs, for 32-layer LLMs (the release's layer_list [8, 16, 24])

    def __init__(self, layers: list[int] | tuple[int, ...] | None = None,
                 ratios: list[float] | tuple[float, ...] = (0.5, 0.25)) -> None:
        self.init_stages(layers, ratios)

    def stage_signals(self, signals: Signals, hooks: Any, hidden: torch.Tensor, layer: int) -> None:
        """The last prompt token's attention at layer ``layer + 1`` on layer ``layer``'s output ``hidden``
        ``[B, N_cur, D]`` (the drop layer's view of its own input), gathered to the current visual tokens."""
        from vtprune.adapters.attention_rows import llm_query_attention
        from vtprune.signals import gather_padded

        sess = hooks.state.session
        _, query, valid = hooks._current(sess)
        att = llm_query_attention(hooks.layers[layer + 1], hidden, sess.stage_rope, query, valid)  # [B, N_cur]
        signals.extras = {**signals.extras, ATTENTION: gather_padded(att, signals.layout)}

    def score(self, signals: Signals) -> torch.Tensor:
        """``[B, N_max]`` float32 (``-inf`` on padding)."""
        if ATTENTION not in signals.extras:
            raise RuntimeError("pyramiddrop: its stage signals were not computed (it runs only inside the LLM stage)")
        return signals.extras[ATTENTION]
