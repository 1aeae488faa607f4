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

The gathered masks keep the form the model's attention implementation takes (`mask_contract`): a 4D mask
for sdpa and eager, a 2D key validity (or None) for FlashAttention, a `BlockMask` for flex_attention.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vtprune.adapters.attention_rows import layer_rope, llm_query_attention, takes_seq_len
from vtprune.config import ConfigError
from vtprune.kernels import compact
from vtprune.layout import VisualLayout, slots_of
from vtprune.plan import in_llm_plan
from vtprune.runtime.cache import is_block_mask
from vtprune.runtime.continuation import replayed_selection
from vtprune.runtime.stages import CONTEXTUAL, contextual_among, stage_for
from vtprune.scorers.base import (
    FIRST_TOKEN_STATE,
    HIDDEN_STATES,
    IN_LLM,
    LLM_ATTENTION,
    PIXEL_VALUES,
    Signals,
)
from vtprune.scorers.select import Selection, select
from vtprune.signals import gather_padded, per_sample
from vtprune.state import PruneState, PruneStats, Session, cache_length


def _masked_value(mask: torch.Tensor):
    return False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min


def _allowed_value(mask: torch.Tensor):
    return True if mask.dtype == torch.bool else 0.0


def build_keep_index(sess: Session, kept: list[torch.Tensor],
                     pool: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence positions each sample keeps, padded with fillers to a common length.

    Args:
        kept: per sample, the kept indices into its visual tokens.
        pool: ``[B, M]`` for a later stage of staged pruning: the positions the previous stage kept
            (fillers included); fillers are then taken from those, so every slot exists in the current
            compacted sequence.

    Returns:
        keep_seq: ``[B, N']`` long; fillers first (if any), then the kept positions in order.
        filler: ``[B, N']`` bool, True on filler slots.
    """
    lay = sess.layout
    n = sess.llm_len
    device = lay.positions[0].device if lay.positions else torch.device("cpu")
    rows, drops = [], []
    for b in range(lay.batch_size):
        vis = lay.positions[b]
        keep_mask = torch.ones(n, dtype=torch.bool, device=device)
        keep_mask[vis] = False
        keep_mask[vis[kept[b].to(device)]] = True
        rows.append(torch.nonzero(keep_mask).flatten())
        if pool is None:
            drops.append(torch.nonzero(~keep_mask).flatten())
        else:
            cand = pool[b].to(device)
            drops.append(cand[~keep_mask[cand]])
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


def visual_mask(lay: VisualLayout, n: int) -> torch.Tensor:
    """``[B, n]`` bool, True at ``lay``'s visual positions (in the coordinates the layout indexes)."""
    pad = lay.padded
    out = torch.zeros(lay.batch_size, n + 1, dtype=torch.bool, device=pad.positions.device)
    out.scatter_(1, pad.positions.clamp(max=n), pad.valid)
    return out[:, :n]


# ---- the mask each attention implementation takes ------------------------------------------------
MASK_4D, MASK_2D, MASK_FLEX = "4d", "2d", "flex"


def mask_contract(implementation: str | None) -> str | None:
    """The attention mask the decoder layers of ``implementation`` (a config's ``_attn_implementation``) get:

    - ``"4d"``: sdpa, eager: ``[B|1, 1, Q, K]`` bool or additive, or None for plain causal attention;
    - ``"2d"``: FlashAttention 2/3/4 and flash kernels from the Hub: a ``[B, K]`` key validity (True: a real
      token), or None without padding; the kernel applies causality itself, aligned bottom-right over each
      row's valid tokens in order (unpadded by the mask, or one sequence per row);
    - ``"flex"``: flex_attention: a `BlockMask`;
    - None: a name registered with transformers' ``AttentionInterface`` but not with ``AttentionMaskInterface``:
      transformers then passes no mask at all, so nothing can be hidden from the kernel.

    A registered mask function transformers does not ship is classified by name ("flash", "flex"), else 4d.
    """
    name = implementation or "eager"
    by_name = MASK_2D if "flash" in name else MASK_FLEX if "flex" in name else MASK_4D
    try:
        from transformers import masking_utils as mu
    except ImportError:  # transformers 4.x: flash attention takes the 2D mask, the others a 4D one
        return MASK_2D if "flash" in name else MASK_4D
    fn = mu.ALL_MASK_ATTENTION_FUNCTIONS.get(name)
    if fn is None:
        return MASK_4D if name == "eager" else None
    known = {mu.sdpa_mask: MASK_4D, mu.eager_mask: MASK_4D, mu.flash_attention_mask: MASK_2D,
             mu.flex_attention_mask: MASK_FLEX}
    return known.get(fn, by_name)


def llm_implementation(layers: Any) -> str | None:
    """The attention implementation of the decoder layers ``layers`` (their config's, None if unknown)."""
    config = getattr(getattr(layers[0], "self_attn", None), "config", None) if len(layers) else None
    return getattr(config, "_attn_implementation", None)


def check_attention(layers: Any) -> str:
    """The `mask_contract` of decoder ``layers``; `ConfigError` when transformers gives their attention no mask."""
    impl = llm_implementation(layers)
    contract = mask_contract(impl)
    if contract is None:
        raise ConfigError(
            f"attn_implementation={impl!r} has no mask function (transformers.AttentionMaskInterface), so "
            "transformers passes it no attention mask and vtprune cannot hide padding or dropped tokens from it: "
            f"register the one its kernel takes (AttentionMaskInterface.register({impl!r}, sdpa_mask) for a 4-D "
            "mask, flash_attention_mask for a 2-D one, flex_attention_mask for a BlockMask; from "
            "transformers.masking_utils) or load the model with attn_implementation='sdpa'"
        )
    return contract


def _flex_gather(mask: Any, rows: torch.Tensor | None, cols: torch.Tensor, hide: torch.Tensor | None,
                 own: torch.Tensor | None) -> Any:
    """The `BlockMask` of ``mask`` (a `BlockMask`) gathered to query rows ``rows`` (``[B, Q']``, None: its own
    rows) and key columns ``cols`` (``[B, K']``), with the keys ``hide`` (``[B, K']`` bool) hidden and the
    rows ``own`` (``[B, Q']`` bool: fillers) also attending their own slot: the 4D path's mask, as a mask_mod
    that indexes the model's own mask_mod (flex_attention compiles it into its kernel, as document masks)."""
    from torch.nn.attention.flex_attention import create_block_mask

    base = mask.mask_mod

    def mask_mod(b, h, q, kv):
        ok = base(b, h, q if rows is None else rows[b, q], cols[b, kv])
        if hide is not None:
            ok = ok & ~hide[b, kv]
        if own is not None:
            ok = ok | (own[b, q] & (q == kv))
        return ok

    q_len = mask.shape[-2] if rows is None else rows.shape[1]
    return create_block_mask(mask_mod, B=cols.shape[0], H=None, Q_LEN=q_len, KV_LEN=cols.shape[1],
                             device=cols.device, BLOCK_SIZE=mask.BLOCK_SIZE)


def prefill_mask(mask: Any, keep_seq: torch.Tensor, filler: torch.Tensor, seq_len: int, ragged: bool,
                 contract: str = MASK_4D) -> Any:
    """The mask of layers after a pruning point during prefill, in the form the layers got ``mask`` in.

    4D (or None under a 4D ``contract``): rows and columns gathered to ``keep_seq``; None stays None unless
    fillers need hiding (``ragged``, the plan's host flag). 2D (or None under the 2D contract): the key
    validity of the kept slots, fillers False; the kernel's causality over each row's valid tokens in order
    is the 4D mask's, because ``keep_seq`` keeps sequence order. `BlockMask`: the gathered 4D mask.
    """
    if is_block_mask(mask):
        return _flex_gather(mask, keep_seq, keep_seq, filler if ragged else None, filler if ragged else None)
    if mask is None and not ragged:
        return None
    if (mask is not None and mask.dim() == 2) or (mask is None and contract == MASK_2D):
        out = mask.bool().gather(1, keep_seq) if mask is not None else None
        return ~filler if out is None else (out & ~filler if ragged else out)
    if mask is None:
        mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=keep_seq.device).tril()[None, None]
    out = _gather_mask(mask, keep_seq, keep_seq).clone()
    if ragged:
        fill = filler[:, None, None, :].expand_as(out)
        out = out.masked_fill(fill, _masked_value(out))
        diag = torch.diag_embed(filler)[:, None]  # filler rows attend themselves only
        out = out.masked_fill(diag, _allowed_value(out))
    return out


def decode_mask(mask: Any, keep_seq: torch.Tensor, filler: torch.Tensor, seq_len: int, q_len: int, kv_len: int,
                ragged: bool, contract: str = MASK_4D) -> Any:
    """The mask of layers after a pruning point for a step after prefill: columns ``kept ++ [N, kv_len)``
    (fillers hidden when ``ragged``, the plan's host flag), in the form the layers got ``mask`` in (see
    `prefill_mask`; a 2D mask's new columns are the step's own)."""
    bsz = keep_seq.shape[0]
    device = keep_seq.device
    flat = (mask is not None and not is_block_mask(mask) and mask.dim() == 2) or (mask is None and contract == MASK_2D)
    if mask is None and not ragged:
        return None
    new = torch.arange(seq_len, kv_len, device=device)[None].expand(bsz, -1)
    if is_block_mask(mask):
        hide = torch.cat([filler, torch.zeros_like(new, dtype=torch.bool)], dim=1) if ragged else None
        return _flex_gather(mask, None, torch.cat([keep_seq, new], dim=1), hide, None)
    if flat:
        head = mask[:, :seq_len].bool().gather(1, keep_seq) if mask is not None else None
        if ragged:
            head = ~filler if head is None else head & ~filler
        tail = mask[:, seq_len:].bool() if mask is not None else torch.ones_like(new, dtype=torch.bool)
        return torch.cat([head, tail], dim=1)
    cols = torch.cat([keep_seq, new], dim=1)
    if mask is None:
        qpos = torch.arange(kv_len - q_len, kv_len, device=device)
        mask = (torch.arange(kv_len, device=device)[None] <= qpos[:, None])[None, None]
    out = _gather_mask(mask, None, cols).clone()
    if ragged:
        hide = torch.cat([filler, torch.zeros_like(new, dtype=torch.bool)], dim=1)
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
    """Installs and runs the decoder-layer hooks of in-LLM pruning at the layers of ``state.schedule``.

    Single-stage methods prune once after layer K. Staged methods (several ``(K_j, keep_j)``) prune again
    after each later K_j among the tokens still present; every stage's ``keep_seq`` holds original sequence
    positions, so layers after K_j gather the model's own mask and RoPE tables with it, and during
    decoding each layer gathers the mask columns of the stage whose cache it holds.
    """

    def __init__(self, state: PruneState, layers: torch.nn.ModuleList) -> None:
        self.state = state
        self.layers = layers
        self.schedule = list(state.schedule) or [(state.layer, state.config.keep)]
        self.stage_at = {k: j for j, (k, _) in enumerate(self.schedule)}
        self.k = self.schedule[0][0]
        self.last = len(layers) - 1
        self.method = stage_for(state.scorer)  # the method's own stage work (signals, selection), if any
        self.contract = state.attention_contract  # the form of the masks the layers take (Runtime.install)

    def stage_of_layer(self, i: int) -> int:
        """Index of the stage whose kept tokens layer ``i`` (> K_0) sees: the last with K_j < i."""
        return max(j for j, (k, _) in enumerate(self.schedule) if k < i)

    def install(self) -> list:
        handles = []
        for i, layer in enumerate(self.layers):
            if i > self.k:  # gather first: a later stage's scoring reads the gathered RoPE tables and mask
                handles.append(layer.register_forward_pre_hook(self._make_pre_after(i), with_kwargs=True))
                rotary = getattr(layer.self_attn, "rotary_emb", None)
                if rotary is not None and takes_seq_len(rotary):  # transformers 4.37
                    handles.append(rotary.register_forward_pre_hook(self._rope_table_length, with_kwargs=True))
            if i in self.stage_at:
                j = self.stage_at[i]
                handles.append(layer.register_forward_pre_hook(self._make_pre_stage(j), with_kwargs=True))
                handles.append(layer.register_forward_hook(self._make_post_stage(j), with_kwargs=True))
            if i == self.last:
                handles.append(layer.register_forward_hook(self._post_last, with_kwargs=True))
        return handles

    # ---- where the current stage's tokens are ---------------------------------------------------
    def _current(self, sess: Session):
        """(visual positions per sample in the current coordinates, query position [B], key validity [B, N_cur])."""
        lay = sess.layout
        if not sess.stage_seqs:
            return lay.positions, sess.query_pos, sess.attention_2d
        keep_seq, filler = sess.stage_seqs[-1]
        kept = sess.stage_kept[-1]
        positions = []
        for b in range(lay.batch_size):
            orig = lay.positions[b][kept[b].to(lay.positions[b].device)]
            positions.append(slots_of(keep_seq[b:b + 1], orig[None], sess.llm_len)[0])
        query = slots_of(keep_seq, sess.query_pos[:, None], sess.llm_len)[:, 0]
        valid = sess.attention_2d.gather(1, keep_seq) & ~filler
        return positions, query, valid

    def _sub_layout(self, sess: Session, positions: list[torch.Tensor]) -> VisualLayout:
        """The layout of the tokens still present, indexed in the current coordinates (later stages)."""
        lay = sess.layout
        if not sess.stage_seqs:
            return lay
        kept = sess.stage_kept[-1]

        def take(field):
            return [t[k.to(t.device)] for t, k in zip(field, kept)]

        return VisualLayout(positions, take(lay.image), take(lay.prunable), take(lay.source), take(lay.coords),
                            seq_len=int(sess.stage_seqs[-1][0].shape[1]))

    # ---- a pruning layer ------------------------------------------------------------------------
    def _make_pre_stage(self, j: int):
        def hook(module, args, kwargs):
            sess = self.state.session
            if sess.phase != "prefill" or sess.layout is None or len(sess.stage_seqs) != j:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            sess.llm_attention = None
            sess.stage_rope = None
            if self.state.scorer.needs_signal(LLM_ATTENTION):
                with self.state.timer.part("score"):
                    _, query, valid = self._current(sess)
                    rope = layer_rope(module, hidden, kwargs)
                    sess.stage_rope = rope
                    sess.llm_attention = llm_query_attention(module, hidden, rope, query, valid)
            elif len(self.schedule) > 1 or self.method.has_llm_signals:
                sess.stage_rope = layer_rope(module, hidden, kwargs)
            return None

        return hook

    def _make_post_stage(self, j: int):
        def hook(module, args, kwargs, output):
            sess = self.state.session
            if sess.phase != "prefill" or sess.layout is None or len(sess.stage_seqs) != j:
                return None
            return self._prune(j, output)

        return hook

    def _prune(self, j: int, output):
        sess = self.state.session
        hidden = output[0] if isinstance(output, tuple) else output
        layer_k, keep_j = self.schedule[j]
        with self.state.timer.part("score"):
            positions, _, _ = self._current(sess)
            sub = self._sub_layout(sess, positions)
            sel, scores, writes = self._select(hidden, sub, j, layer_k, keep_j)
            sess.selections[j] = sel
            scores = per_sample(scores, sub)  # views, for the stats
            picked = sel.kept()
            if sess.stage_seqs:
                prev = sess.stage_kept[-1]
                kept = [p[s.to(p.device)] for p, s in zip(prev, picked)]
            else:
                kept = picked
        with self.state.timer.part("compact"):
            if not sess.stage_seqs:  # first pruning point: a plan built without reading the device
                plan = in_llm_plan(sel, visual_mask(sub, int(hidden.shape[1])).to(hidden.device))
                keep_seq, filler, ragged = plan.keep_seq, plan.filler, plan.ragged
                out = compact(hidden, keep_seq)
                sess.full_hidden = hidden
            else:
                prev_seq = sess.stage_seqs[-1][0]
                keep_seq, filler = build_keep_index(sess, kept, pool=prev_seq)
                ragged = bool(filler.any())  # later stages of staged methods read their plan once
                out = compact(hidden, slots_of(prev_seq, keep_seq, sess.llm_len))
                sess.stage_hidden.append((hidden, prev_seq, sess.stage_seqs[-1][1]))
            if writes:  # recycled tokens: their merged state replaces the kept slot's (SparseVLM)
                out = out.clone()
                for b, (sub_idx, vectors) in writes.items():
                    slots = slots_of(keep_seq[b:b + 1], self._original(sess, b, sub.positions[b][sub_idx])[None],
                                     sess.llm_len)[0]
                    out[b, slots] = vectors.to(out.dtype)
        sess.stage_seqs.append((keep_seq, filler))
        sess.stage_ragged.append(ragged)
        sess.stage_kept.append(kept)
        sess.keep_seq, sess.filler = keep_seq, filler
        sess.mask_cache = {}
        self.state.stats = self._stats_builder(sess, j, layer_k, kept, scores)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    def _stats_builder(self, sess: Session, j: int, layer_k: int, kept: list[torch.Tensor], scores):
        """A function building this stage's `PruneStats` on first access (the prefill reads nothing)."""
        lay = sess.layout
        report, base = kept, lay
        if sess.origin is not None:  # after a pre-LLM stage: report against the original visual tokens
            base, pre_kept = sess.origin
            report = [pk[k.to(pk.device)] for pk, k in zip(pre_kept, kept)]
        prior = self.state.stats if (j > 0 or sess.origin is not None) else None
        before = sess.host_valid.sum(1).tolist() if sess.origin is None else prior.seq_len_before
        dropped = [int(p.numel() - k.numel()) for p, k in zip(base.positions, report)]
        staged = len(self.schedule) > 1 or sess.origin is not None
        method, first = self.state.config.method, self.k
        slots = sess.extras.get(CONTEXTUAL) if sess.origin is not None else None  # a pre-LLM merge's slots

        def build() -> PruneStats:
            stages = None
            if staged:
                if j > 0:
                    earlier = prior.stages
                elif sess.origin is not None:  # the pre-LLM stage, reported as layer None
                    earlier = [{"layer": None, "visual_after": prior.visual_after, "kept": prior.kept}]
                else:
                    earlier = []
                stages = [*earlier, {"layer": layer_k, "visual_after": [int(k.numel()) for k in report],
                                     "kept": [k.cpu() for k in report]}]
            return PruneStats(
                method=method,
                stage=IN_LLM if sess.origin is None else "pre-llm",
                layer=first,
                kept=[k.cpu() for k in report],
                visual_before=base.counts(),
                visual_after=[int(k.numel()) for k in report],
                seq_len_before=[int(x) for x in before],
                seq_len_after=[int(x) - d for x, d in zip(before, dropped)],
                contextual=(prior.contextual if slots is None else contextual_among(slots, report))
                if sess.origin is not None else None,
                scores=scores,
                per_image=[base.kept_per_image(b, k) for b, k in enumerate(report)],
                stages=stages,
            )

        return build

    @staticmethod
    def _original(sess: Session, b: int, current: torch.Tensor) -> torch.Tensor:
        """Sequence positions (of the LLM's prefill) of current-coordinate rows ``current`` of sample ``b``."""
        if not sess.stage_seqs:
            return current
        return sess.stage_seqs[-1][0][b][current.to(sess.stage_seqs[-1][0].device)]

    def _select(self, hidden: torch.Tensor, lay: VisualLayout, j: int, layer: int,
                keep) -> tuple[Selection, list[torch.Tensor], dict]:
        """The scorer's signals from the pruning layer's output ``hidden`` [B, N_cur, D]; the `Selection`
        over ``lay``'s visual tokens, the scores, and rows to overwrite after compaction
        (``{sample: (indices into lay's visual tokens, [m, D] states)}``, recycling methods only)."""
        sess = self.state.session
        ranked = lay.all_candidates() if self.state.scorer.ranks_fixed else lay  # see `Scorer.ranks_fixed`
        signals = Signals(layout=ranked, stage=IN_LLM, layer=layer, keep=keep, extras=sess.extras, stage_index=j)
        if sess.llm_attention is not None:  # one gather; per-sample views only if a scorer asks
            signals.padded_scores[LLM_ATTENTION] = gather_padded(sess.llm_attention, lay)
        if self.state.scorer.needs_signal(HIDDEN_STATES):
            signals.hidden_states = [hidden[b, p] for b, p in enumerate(lay.positions)]
        if self.state.scorer.needs_signal(FIRST_TOKEN_STATE):
            valid = self._current(sess)[2].to(hidden.device)  # [B, N_cur]; argmax: each row's first real token
            signals.first_token_state = hidden[torch.arange(hidden.shape[0], device=hidden.device),
                                               valid.int().argmax(1)]
        if self.state.scorer.needs_signal(PIXEL_VALUES) and self.state.vision_record is not None:
            signals.pixel_values = self.state.vision_record.pixel_values
        self.method.llm_signals(signals, self, hidden, layer)  # staged methods' own (TransPrune's, SparseVLM's)
        scores = self.state.scorer.score(signals)
        own = self.method.llm_select(per_sample(scores, lay), signals, hidden)  # SparseVLM's selection with recycling
        if own is not None:
            picked, writes = own
            return Selection.from_kept(lay, picked), scores, writes
        replayed = replayed_selection(sess, j, lay)  # a continuation: the prompt's
        if replayed is not None:
            return replayed, scores, {}
        sel = select(scores, ranked, keep, excludes=self.state.scorer.excludes)
        return (sel if ranked is lay else dataclasses.replace(sel, layout=lay)), scores, {}

    # ---- layers after the first pruning point ---------------------------------------------------
    def _make_pre_after(self, i: int):
        def hook(module, args, kwargs):
            with self.state.timer.part("compact"):
                return self._gather_after(i, args, kwargs)

        return hook

    def _gather_after(self, i: int, args, kwargs):
        # Per-call results are cached for the layers after K, keyed by the identity of the inputs they
        # derive from; each entry keeps those inputs alive, so a key can never be reused by a new tensor.
        sess = self.state.session
        if sess.keep_seq is None or not sess.stage_seqs:
            return None
        s = self.stage_of_layer(i)
        if s >= len(sess.stage_seqs):
            return None
        keep_seq, filler = sess.stage_seqs[s]
        if sess.phase == "prefill":
            mask, rope = kwargs.get("attention_mask"), kwargs.get("position_embeddings")
            pos = kwargs.get("position_ids")
            key = ("prefill", s, id(mask), id(rope), id(pos))
            if key not in sess.mask_cache:
                gathered = {
                    "attention_mask": prefill_mask(mask, keep_seq, filler, sess.llm_len, sess.stage_ragged[s],
                                                   self.contract),
                    "position_ids": _gather_positions(pos, keep_seq),
                }
                if rope is not None:  # transformers 4.x layers without it rotate from position_ids
                    cos, sin = rope
                    gathered["position_embeddings"] = (compact(cos, keep_seq), compact(sin, keep_seq))
                sess.mask_cache[key] = ((mask, rope, pos), gathered)
            kwargs.update(sess.mask_cache[key][1])
            return args, kwargs
        if sess.phase == "decode":
            # one mask per stage and step: the core's pre-hook starts each step with an empty `step_masks`,
            # the first layer of the stage builds it, the others reuse it
            if s not in sess.step_masks:
                mask = kwargs.get("attention_mask")
                hidden = args[0] if args else kwargs["hidden_states"]
                # layer 0 has already cached this step's tokens, so its length is the full key length
                kv_len = mask.shape[-1] if mask is not None else cache_length(sess.step_cache, 0)
                sess.step_masks[s] = decode_mask(mask, keep_seq, filler, sess.llm_len, hidden.shape[1], kv_len,
                                                 sess.stage_ragged[s], self.contract)
            kwargs["attention_mask"] = sess.step_masks[s]
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
        full = max(cache_length(sess.step_cache, 0), sess.llm_len)
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
        with self.state.timer.part("compact"):
            out = sess.full_hidden.clone()
            # each later stage's input rows (the tokens it dropped keep their state there), then the final rows
            for state_in, seq, fill in [*sess.stage_hidden, (hidden, sess.keep_seq, sess.filler)]:
                src = torch.where(fill[..., None], compact(out, seq), state_in.to(out.dtype))
                out.scatter_(1, seq[..., None].expand(-1, -1, out.shape[-1]), src)
        sess.full_hidden = None
        sess.stage_hidden = []
        sess.mask_cache = {}
        return (out, *output[1:]) if isinstance(output, tuple) else out
