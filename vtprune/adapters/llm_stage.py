"""In-LLM pruning: drop visual tokens after decoder layer K, with hooks on the decoder layers.

No transformers code is rewritten and the module tree is unchanged (state dicts stay the same):

- layer K, pre-hook (prefill): recompute the attention row the scorer needs from the layer input.
- layer K, forward hook (prefill): score, select, and return the layer output compacted to the kept
  tokens ``[B, N', D]`` (text tokens are always kept; kept tokens keep their original positions).
- layers > K, pre-hook: prefill: gather RoPE cos/sin, position ids and the 4D mask to the kept tokens;
  decode: gather the mask columns to ``kept ++ new tokens``, because layers <= K cache all N entries
  while layers > K cache only N'.
- last layer, forward hook (prefill): scatter the kept rows back into a ``[B, N, D]`` tensor whose pruned
  rows hold their layer-K state, so logits, ``logits_to_keep`` and right padding work unchanged.

Ragged batches (samples keeping different numbers of tokens) are padded to the longest row with
*filler* slots: dropped tokens that no other token can attend to (each filler attends only itself, so
its state stays finite) and that the decode mask hides too.
"""

from __future__ import annotations

import torch

from vtprune.adapters.attention_rows import layer_rope, llm_query_attention, takes_seq_len
from vtprune.kernels import compact
from vtprune.scorers.base import HIDDEN_STATES, IN_LLM, LLM_ATTENTION, PIXEL_VALUES, Signals
from vtprune.scorers.select import select_topk
from vtprune.state import PruneState, PruneStats, Session, cache_length


def _masked_value(mask: torch.Tensor):
    return False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min


def _allowed_value(mask: torch.Tensor):
    return True if mask.dtype == torch.bool else 0.0


def build_keep_index(sess: Session, kept: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence positions each sample keeps, padded with fillers to a common length.

    Returns:
        keep_seq: ``[B, N']`` long; fillers first (if any), then the kept positions in order.
        filler: ``[B, N']`` bool, True on filler slots.
    """
    lay = sess.layout
    n = sess.seq_len
    device = lay.positions[0].device if lay.positions else torch.device("cpu")
    rows, drops = [], []
    for b in range(lay.batch_size):
        vis = lay.positions[b]
        keep_mask = torch.ones(n, dtype=torch.bool, device=device)
        keep_mask[vis] = False
        keep_mask[vis[kept[b].to(device)]] = True
        rows.append(torch.nonzero(keep_mask).flatten())
        drops.append(torch.nonzero(~keep_mask).flatten())
    width = max(int(r.numel()) for r in rows)
    keep_seq = torch.empty(len(rows), width, dtype=torch.long, device=device)
    filler = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for b, (row, drop) in enumerate(zip(rows, drops)):
        pad = width - row.numel()
        keep_seq[b] = torch.cat([drop[:pad], row])
        filler[b, :pad] = True
    return keep_seq, filler


def _gather_mask(mask: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor:
    """Gather a ``[B|1, H, Q, K]`` mask to ``rows`` (``[B, Q']`` or None: all) and ``cols`` (``[B, K']``)."""
    bsz = cols.shape[0]
    mask = mask.expand(bsz, *mask.shape[1:])
    h, q = mask.shape[1], mask.shape[2]
    if rows is not None:
        q = rows.shape[1]
        mask = mask.gather(2, rows[:, None, :, None].expand(bsz, h, q, mask.shape[3]))
    return mask.gather(3, cols[:, None, None, :].expand(bsz, h, q, cols.shape[1]))


def prefill_mask(mask: torch.Tensor | None, sess: Session) -> torch.Tensor | None:
    """The 4D mask of layers > K during prefill (None stays None unless fillers need hiding)."""
    ragged = bool(sess.filler.any())
    if mask is None and not ragged:
        return None
    keep_seq = sess.keep_seq
    if mask is None:
        n = sess.seq_len
        mask = torch.ones(n, n, dtype=torch.bool, device=keep_seq.device).tril()[None, None]
    out = _gather_mask(mask, keep_seq, keep_seq).clone()
    if ragged:
        fill = sess.filler[:, None, None, :].expand_as(out)
        out = out.masked_fill(fill, _masked_value(out))
        diag = torch.diag_embed(sess.filler)[:, None]  # filler rows attend themselves only
        out = out.masked_fill(diag, _allowed_value(out))
    return out


def decode_mask(mask: torch.Tensor | None, sess: Session, q_len: int, kv_len: int) -> torch.Tensor | None:
    """The 4D mask of layers > K for a step after prefill: columns ``kept ++ [N, kv_len)``."""
    ragged = bool(sess.filler.any())
    if mask is None and not ragged:
        return None
    bsz = sess.keep_seq.shape[0]
    device = sess.keep_seq.device
    new = torch.arange(sess.seq_len, kv_len, device=device)[None].expand(bsz, -1)
    cols = torch.cat([sess.keep_seq, new], dim=1)
    if mask is None:
        qpos = torch.arange(kv_len - q_len, kv_len, device=device)
        mask = (torch.arange(kv_len, device=device)[None] <= qpos[:, None])[None, None]
    out = _gather_mask(mask, None, cols).clone()
    if ragged:
        hide = torch.cat([sess.filler, torch.zeros_like(new, dtype=torch.bool)], dim=1)
        out = out.masked_fill(hide[:, None, None, :].expand_as(out), _masked_value(out))
    return out


def _gather_positions(position_ids: torch.Tensor | None, keep_seq: torch.Tensor):
    if position_ids is None:
        return None
    if position_ids.dim() == 2:
        return compact(position_ids, keep_seq)
    if position_ids.dim() == 3:  # [3|4, B, N] multimodal RoPE ids
        idx = keep_seq[None].expand(position_ids.shape[0], -1, -1)
        return position_ids.expand(-1, keep_seq.shape[0], -1).gather(2, idx)
    raise ValueError(f"unsupported position_ids shape {tuple(position_ids.shape)}")


class LLMStageHooks:
    """Installs and runs the decoder-layer hooks of in-LLM pruning after layer ``state.layer``."""

    def __init__(self, state: PruneState, layers: torch.nn.ModuleList) -> None:
        self.state = state
        self.layers = layers
        self.k = state.layer
        self.last = len(layers) - 1

    def install(self) -> list:
        handles = []
        for i, layer in enumerate(self.layers):
            if i == self.k:
                handles.append(layer.register_forward_pre_hook(self._pre_k, with_kwargs=True))
                handles.append(layer.register_forward_hook(self._post_k, with_kwargs=True))
            elif i > self.k:
                handles.append(layer.register_forward_pre_hook(self._pre_after, with_kwargs=True))
                rotary = getattr(layer.self_attn, "rotary_emb", None)
                if rotary is not None and takes_seq_len(rotary):  # transformers 4.37
                    handles.append(rotary.register_forward_pre_hook(self._rope_table_length, with_kwargs=True))
            if i == self.last:
                handles.append(layer.register_forward_hook(self._post_last, with_kwargs=True))
        return handles

    # ---- layer K ------------------------------------------------------------------------------
    def _pre_k(self, module, args, kwargs):
        sess = self.state.session
        if sess.phase != "prefill" or sess.layout is None:
            return None
        sess.llm_attention = None
        if self.state.scorer.needs_signal(LLM_ATTENTION):
            hidden = args[0] if args else kwargs["hidden_states"]
            with self.state.timer.part("score"):
                sess.llm_attention = llm_query_attention(
                    module, hidden, layer_rope(module, hidden, kwargs), sess.query_pos, sess.attention_2d
                )
        return None

    def _post_k(self, module, args, kwargs, output):
        sess = self.state.session
        if sess.phase != "prefill" or sess.layout is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        with self.state.timer.part("score"):
            kept, scores = self._select(hidden)
        with self.state.timer.part("compact"):
            sess.keep_seq, sess.filler = build_keep_index(sess, kept)
            out = compact(hidden, sess.keep_seq)
        sess.full_hidden = hidden
        sess.mask_cache = {}
        before = sess.attention_2d.sum(1).tolist()
        dropped = [int(p.numel() - k.numel()) for p, k in zip(sess.layout.positions, kept)]
        self.state.stats = PruneStats(
            method=self.state.config.method,
            stage=IN_LLM,
            layer=self.k,
            kept=[k.cpu() for k in kept],
            visual_before=sess.layout.counts(),
            visual_after=[int(k.numel()) for k in kept],
            seq_len_before=[int(x) for x in before],
            seq_len_after=[int(x) - d for x, d in zip(before, dropped)],
            scores=scores,
            per_image=[sess.layout.kept_per_image(b, k) for b, k in enumerate(kept)],
        )
        return (out, *output[1:]) if isinstance(output, tuple) else out

    def _select(self, hidden: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The scorer's signals from layer K's output ``hidden`` [B, N, D]; per sample kept indices and scores."""
        sess = self.state.session
        lay = sess.layout
        signals = Signals(layout=lay, stage=IN_LLM, layer=self.k, keep=self.state.config.keep,
                          extras=sess.extras)
        if sess.llm_attention is not None:
            signals.llm_attention = [sess.llm_attention[b, p] for b, p in enumerate(lay.positions)]
        if self.state.scorer.needs_signal(HIDDEN_STATES):
            signals.hidden_states = [hidden[b, p] for b, p in enumerate(lay.positions)]
        if self.state.scorer.needs_signal(PIXEL_VALUES) and self.state.vision_record is not None:
            signals.pixel_values = self.state.vision_record.pixel_values
        scores = self.state.scorer.score(signals)
        return select_topk(scores, lay, self.state.config.keep), scores

    # ---- layers after K -----------------------------------------------------------------------
    def _pre_after(self, module, args, kwargs):
        with self.state.timer.part("compact"):
            return self._gather_after(args, kwargs)

    def _gather_after(self, args, kwargs):
        # Per-call results are cached for the layers after K, keyed by the identity of the inputs they
        # derive from; each entry keeps those inputs alive, so a key can never be reused by a new tensor.
        sess = self.state.session
        if sess.phase == "prefill" and sess.keep_seq is not None:
            mask, rope = kwargs.get("attention_mask"), kwargs.get("position_embeddings")
            pos = kwargs.get("position_ids")
            key = ("prefill", id(mask), id(rope), id(pos))
            if key not in sess.mask_cache:
                gathered = {
                    "attention_mask": prefill_mask(mask, sess),
                    "position_ids": _gather_positions(pos, sess.keep_seq),
                }
                if rope is not None:  # transformers 4.x layers without it rotate from position_ids
                    cos, sin = rope
                    gathered["position_embeddings"] = (compact(cos, sess.keep_seq), compact(sin, sess.keep_seq))
                sess.mask_cache[key] = ((mask, rope, pos), gathered)
            kwargs.update(sess.mask_cache[key][1])
            return args, kwargs
        if sess.phase == "decode" and sess.keep_seq is not None:
            mask = kwargs.get("attention_mask")
            hidden = args[0] if args else kwargs["hidden_states"]
            q_len = hidden.shape[1]
            # layer 0 has already cached this step's tokens, so its length is the full key length
            kv_len = mask.shape[-1] if mask is not None else cache_length(sess.step_cache, 0)
            key = ("decode", id(mask), q_len, kv_len)
            if key not in sess.mask_cache:
                sess.mask_cache = {key: (mask, decode_mask(mask, sess, q_len, kv_len))}  # one step at a time
            kwargs["attention_mask"] = sess.mask_cache[key][1]
            return args, kwargs
        return None

    def _rope_table_length(self, module, args, kwargs):
        """transformers 4.37: a layer after K asks its rotary table for ``seq_len`` = its own (shorter)
        key length, then indexes the table by the kept tokens' original positions; ask for the full
        length instead (the unpruned model's value: also what dynamic-NTK scaling must see)."""
        sess = self.state.session
        asked = kwargs.get("seq_len")
        if sess.keep_seq is None or asked is None:
            return None
        full = max(cache_length(sess.step_cache, 0), sess.seq_len)
        if asked < full:
            kwargs["seq_len"] = full
            return args, kwargs
        return None

    # ---- last layer ---------------------------------------------------------------------------
    def _post_last(self, module, args, kwargs, output):
        sess = self.state.session
        if sess.phase != "prefill" or sess.keep_seq is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        full = sess.full_hidden
        with self.state.timer.part("compact"):
            src = torch.where(sess.filler[..., None], compact(full, sess.keep_seq), hidden)
            out = full.clone()
            out.scatter_(1, sess.keep_seq[..., None].expand(-1, -1, full.shape[-1]), src.to(full.dtype))
        sess.full_hidden = None
        sess.mask_cache = {}
        return (out, *output[1:]) if isinstance(output, tuple) else out
