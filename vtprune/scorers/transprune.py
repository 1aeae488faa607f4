"""TransPrune: token transition variation plus instruction-guided attention, pruned in stages inside the LLM."""

from __future__ import annotations

from typing import Any

import torch

from vtprune.config import ConfigError
from vtprune.perthread import PerThread
from vtprune.scorers.base import IN_LLM, Scorer, Signals, register
from vtprune.scorers.staged import StagedLayers

TTV = "transprune_ttv"  # Session.extras key: [B, N] accumulated TTV in original sequence positions


def transition_variation(x_in: torch.Tensor, x_out: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` float32 ``tau = (||x_out|| / ||x_in||) * softmax_valid(1 - cos(x_in, x_out))`` of one sublayer.

    ``x_in`` is the normalised input that feeds the sublayer, ``x_out`` its output before the residual add,
    both ``[B, N, D]``; the softmax runs over each sample's valid tokens (padding and fillers get 0).
    """
    a, b = x_in.float(), x_out.float()
    ratio = b.norm(dim=-1) / a.norm(dim=-1).clamp(min=1e-12)
    delta = 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1)
    weights = torch.softmax(delta.masked_fill(~valid, float("-inf")), dim=-1)
    return torch.where(valid, ratio * weights, torch.zeros_like(ratio))


@register
class TransPruneScorer(StagedLayers, Scorer):
    """TransPrune (Li et al., 2025, "TransPrune: Token Transition Pruning for Efficient Large
    Vision-Language Model"): S = TTV / sum(TTV) + IGA / sum(IGA) over each image's current visual tokens.

    - Token transition variation: for every layer in ``accumulate`` (default: from the first to the last
      pruning layer) and each sublayer (attention, MLP), with ``x_in`` the normalised sublayer input and
      ``x_out`` its output, ``tau = (||x_out|| / ||x_in||) * softmax over the sequence of
      (1 - cos(x_in, x_out))``; TTV sums tau over sublayers and layers (kept per original position, so it
      follows the tokens through the stages).
    - Instruction-guided attention: at a pruning point after layer l, layer l + 1's input norm, q / k
      projections and RoPE on layer l's output; rows = the instruction (text after the last image),
      softmax over all keys (causal), head-mean, averaged over the rows.
    - Stages: prune after ``layers`` (default 0-based 6, 8, 11, the release's), keeping ``ratios`` of
      each image's tokens before the last stage (0.875, 0.625: 504 and 360 of 576) and ``keep`` after it.

    Deviation: kept tokens keep their original positions (the reference re-indexes them contiguously);
    the budget is per image. The default layers are the release's on 32-layer LLMs and keep their depth
    fractions on others (`depth_scaled`); explicit ``layers=[...]`` are used as given.
    """

    name = "transprune"
    description = "TransPrune: token transition variation + instruction-guided attention, staged in the LLM"
    stages = (IN_LLM,)

    PAPER_LAYERS = (6, 8, 11)  # 0-based, for 32-layer LLMs; other depths get them scaled (`depth_scaled`)

    def __init__(self, layers: list[int] | tuple[int, ...] | None = None,
                 ratios: list[float] | tuple[float, ...] = (0.875, 0.625),
                 accumulate: list[int] | tuple[int, ...] | None = None) -> None:
        self.init_stages(layers, ratios)
        if accumulate is not None and (len(accumulate) != 2 or int(accumulate[0]) > int(accumulate[1])):
            raise ConfigError(f"transprune: accumulate={accumulate} must be [first, last] layers")
        self.accumulate = [int(a) for a in accumulate] if accumulate is not None else None

    # per stage of the last prefill, the TTV and IGA parts of the score (a debugging record, per thread)
    last_parts = PerThread(factory=list)

    def _accumulated(self) -> range:
        first, last = self.accumulate if self.accumulate is not None else (self.layers[0], self.layers[-1])
        return range(first, last + 1)

    def schedule(self, model: Any, adapter: Any, layer: int, keep: Any) -> list[tuple[int, Any]]:
        plan = super().schedule(model, adapter, layer, keep)
        if self._accumulated()[-1] > len(adapter.decoder_layers()) - 1:
            raise ConfigError(f"transprune: accumulate={self.accumulate} reaches past the model's last layer")
        return plan

    # ---- TTV: hooks on the sublayers of the accumulation layers ----------------------------------
    def model_hooks(self, adapter: Any, state: Any) -> list:
        layers = adapter.decoder_layers()
        handles = []
        for i in self._accumulated():
            layer = layers[i]
            handles.append(layer.self_attn.register_forward_hook(self._make_ttv_hook(state, True), with_kwargs=True))
            handles.append(layer.mlp.register_forward_hook(self._make_ttv_hook(state, False), with_kwargs=True))
        return handles

    @staticmethod
    def _make_ttv_hook(state: Any, attention: bool):
        def hook(module, args, kwargs, output):
            sess = state.session
            if not state.enabled or sess.phase != "prefill" or sess.layout is None:
                return None
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            if sess.stage_seqs:
                seq, fill = sess.stage_seqs[-1]
                valid = sess.attention_2d.gather(1, seq) & ~fill
            else:
                seq = torch.arange(sess.seq_len, device=x_in.device).expand(x_in.shape[0], -1)
                valid = sess.attention_2d
            tau = transition_variation(x_in, x_out, valid.to(x_in.device))
            acc = sess.extras.get(TTV)
            if acc is None:
                acc = sess.extras[TTV] = torch.zeros(x_in.shape[0], sess.seq_len, device=x_in.device)
            acc.scatter_add_(1, seq.to(acc.device), tau)
            return None

        return hook

    # ---- the stage's signals and score ----------------------------------------------------------
    def stage_signals(self, signals: Signals, hooks: Any, hidden: torch.Tensor, layer: int) -> None:
        """TTV of the current visual tokens and the instruction's attention at layer ``layer + 1``."""
        from vtprune.adapters.attention_rows import llm_rows_attention
        from vtprune.layout import slots_of

        sess = hooks.state.session
        lay = signals.layout  # current coordinates
        seq = sess.stage_seqs[-1][0] if sess.stage_seqs else None
        _, _, valid = hooks._current(sess)
        full_lay = sess.layout
        rows = []
        for b in range(lay.batch_size):
            last = int(full_lay.positions[b].max()) if full_lay.positions[b].numel() else -1
            after = torch.nonzero((torch.arange(sess.seq_len, device=sess.attention_2d.device) > last)
                                  & sess.prompt_valid()[b]).flatten()
            rows.append(after if seq is None else slots_of(seq[b:b + 1], after[None], sess.seq_len)[0])
        iga = llm_rows_attention(hooks.layers[layer + 1], hidden, sess.stage_rope, rows, valid)
        ttv = sess.extras.get(TTV)
        cur_ttv = []
        for b in range(lay.batch_size):
            orig = lay.positions[b] if seq is None else seq[b][lay.positions[b]]
            cur_ttv.append(ttv[b, orig] if ttv is not None else torch.zeros(orig.numel(), device=hidden.device))
        signals.extras = {**signals.extras, "ttv": cur_ttv,
                          "iga": [iga[b, p] for b, p in enumerate(lay.positions)]}

    def score(self, signals: Signals) -> list[torch.Tensor]:
        if "ttv" not in signals.extras:
            raise RuntimeError("transprune: its stage signals were not computed (it runs only inside the LLM stage)")
        out, parts = [], {"ttv": [], "iga": []}
        lay = signals.layout
        for b in range(lay.batch_size):
            ttv, iga = signals.extras["ttv"][b].float(), signals.extras["iga"][b].float()
            s = torch.zeros_like(ttv)
            for idx in lay.image_slices(b):
                idx = idx.to(ttv.device)
                t, a = ttv[idx], iga[idx]
                s[idx] = t / t.sum().clamp(min=1e-12) + a / a.sum().clamp(min=1e-12)
            out.append(s)
            parts["ttv"].append(ttv.detach())  # on the device: a record costs no host sync
            parts["iga"].append(iga.detach())
        if signals.stage_index == 0:  # a new prefill: one entry per stage, not a growing history
            self.last_parts = []
        self.last_parts.append(parts)
        return out
