"""Pre-LLM pruning: shorten the embedding sequence between the vision tower and the LLM.

The language model then runs exactly as if each image had fewer tokens. Positions follow the adapter:
LLaVA's are contiguous over the shortened sequence (decode positions shift by the number of removed
tokens); Qwen-VL's kept tokens keep their original 3-D M-RoPE positions. Decode steps see the shortened
attention mask, so ``generate()`` keeps working. When samples keep different numbers of tokens
the shortened rows are re-padded on the side the batch was already padded on (left if unpadded).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from vtprune.kernels import compact
from vtprune.layout import VisualLayout, last_true
from vtprune.plan import padding_side, pre_llm_plan
from vtprune.runtime.cache import is_prepared_mask, query_length
from vtprune.runtime.continuation import replayed_selection
from vtprune.runtime.stages import stage_for
from vtprune.runtime.visionzip import vision_features
from vtprune.scorers.base import (
    HIDDEN_STATES,
    INSTRUCTION,
    PIXEL_VALUES,
    PRE_LLM,
    VISION_CLS_ATTENTION,
    VISION_FEATURES,
    Signals,
)
from vtprune.scorers.select import Selection, select, select_tiles
from vtprune.signals import cls_scores_padded, per_sample
from vtprune.state import PruneState, PruneStats, Session

if TYPE_CHECKING:
    from vtprune.adapters.base import Adapter, ImageInputs


def shorten_prefill_inputs(
    adapter: Adapter, state: PruneState, kwargs: dict[str, Any], images: ImageInputs, visual: torch.Tensor,
    trim_padding: bool = False,
) -> None:
    """Score and drop visual tokens before the LLM; rewrites ``kwargs`` of the core forward in place.

    Args:
        images: the call's images; encoded here unless ``generate()`` already did.
        visual: ``[B, N]`` bool, True on image placeholder tokens.
        trim_padding: drop the padding too and re-pad to the longest shortened row (the LLaVA
            repository pads to its longest *spliced* row, hundreds of image tokens wide); otherwise the
            padding slots stay, so positions computed from the sequence do not move.
    """
    sess = state.session
    lay = sess.layout
    adapter.ensure_encoded(state, images)
    original = dict(kwargs)
    input_ids = kwargs.get("input_ids")
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = adapter.embed(input_ids)
    embeds = adapter.merge_visual_features(images, embeds, sess.kinds, sess.host_kinds)

    with state.timer.part("score"):  # signals, scores and selection
        budget = state.pre_keep if state.pre_keep is not None else state.config.keep
        record = images.record  # set by ensure_encoded where the call holds images; never an earlier call's
        # a scorer that ranks the never-pruned tokens (newlines) inside the budget sees them as candidates
        ranked = lay.all_candidates() if state.scorer.ranks_fixed else lay
        signals = Signals(layout=ranked, stage=PRE_LLM, keep=budget, extras=sess.extras, vision_record=record,
                          video_record=getattr(images, "video_record", None))
        per_token = not state.scorer.per_tile  # a per-tile scorer reads its tiles (`_with_tiles`) instead
        if per_token and state.scorer.needs_signal(VISION_CLS_ATTENTION):
            # one gather; per-sample views only if a scorer asks
            signals.padded_scores[VISION_CLS_ATTENTION] = cls_scores_padded(adapter.vision_scores(images), lay)
        if per_token and state.scorer.needs_signal(HIDDEN_STATES):
            signals.hidden_states = [embeds[b, p] for b, p in enumerate(lay.positions)]
        if state.scorer.needs_signal(INSTRUCTION):
            signals.instruction_embeds, signals.instruction_ids = instruction_tokens(
                embeds, input_ids, sess.host_prompt_valid(), sess.host_kinds)
        if per_token and state.scorer.needs_signal(VISION_FEATURES):
            signals.vision_features = vision_features(adapter, images, lay.source)
        if state.scorer.needs_signal(PIXEL_VALUES):
            signals.pixel_values = record.pixel_values if record is not None else None
        contextual, scores = None, None
        own = stage_for(state.scorer).pre_llm(adapter, state, images, signals, embeds, budget)
        if own is not None:  # the method selects itself (VisionZip's merge, VFlowOpt's recycling)
            sel, embeds, contextual, scores = own
        else:
            scores = state.scorer.score(signals) if per_token else None
            replayed = replayed_selection(sess, PRE_LLM, lay)  # a continuation: the prompt's
            if replayed is not None:
                sel = replayed
            elif state.scorer.per_tile:  # each tile's whole grid with its own budget, before the unpadding
                tile_scores = state.scorer.score_tiles(_with_tiles(signals, state.scorer, adapter, images))  # [T, S]
                sel = select_tiles(tile_scores, lay, budget, signals.tile_first, keep_fixed=not state.scorer.drops_fixed)
                scores = cls_scores_padded(tile_scores, lay)  # the tokens' rows, for the stats
            else:
                sel = select(scores, ranked, budget, excludes=state.scorer.excludes)
                sel = sel if ranked is lay else dataclasses.replace(sel, layout=lay)
            sess.selections[PRE_LLM] = sel

    with state.timer.part("compact"):  # the shortened sequence, its mask and positions
        mask2d = kwargs.get("attention_mask")
        if trim_padding:
            index, valid, dropped, ragged = _trimmed_rows(sess, sel, visual)
            lengths = [int(x) for x in valid.sum(1)]
        else:
            plan = pre_llm_plan(sel, visual, sess.attention_2d, sess.host_valid)
            index, valid, dropped, ragged, lengths = plan.index, plan.valid, plan.dropped, plan.ragged, plan.lengths
        sess.pre_index, sess.pre_valid, sess.pre_ragged = index, valid, ragged
        sess.pre_removed = dropped.sum(1)
        kwargs["inputs_embeds"] = compact(embeds, index)
        kwargs["input_ids"] = None
        if mask2d is not None or ragged:
            dtype = mask2d.dtype if mask2d is not None else torch.long
            kwargs["attention_mask"] = valid.to(dtype)
        adapter.shortened_positions(sess, original, kwargs, dropped)
        adapter.strip_image_inputs(kwargs)
        adapter.after_shortening(state, images, visual, dropped)

    before = sess.host_valid.sum(1).tolist()
    method = state.config.method
    state.stats = lambda: PruneStats(
        method=method,
        stage=PRE_LLM,
        layer=None,
        kept=[k.cpu() for k in sel.kept()],
        visual_before=lay.counts(),
        visual_after=list(sel.counts),
        seq_len_before=[int(x) for x in before],
        seq_len_after=list(lengths),
        contextual=contextual,
        scores=per_sample(scores, lay) if scores is not None else None,
        per_image=[list(c) for c in sel.per_image],
    )
    if state.schedule:  # LLM stages follow: they run on the shortened sequence
        continue_in_llm(sess, lay, sel.kept(), index, valid)


def _trimmed_rows(sess: Session, sel: Selection, visual: torch.Tensor):
    """Rows of the shortened sequence with the padding dropped as well, re-padded to the longest row (the
    LLaVA repository's prompts, padded to their longest spliced row); padding slots take the row's own
    padding first, so keep-all stays exact. Returns (index, valid, dropped, ragged)."""
    lay = sess.layout
    kept = sel.kept()
    bsz, n = visual.shape
    dropped = visual.clone()
    for b in range(bsz):
        dropped[b, lay.positions[b][kept[b].to(visual.device)]] = False
    keep_rows = ~dropped & sess.attention_2d
    rows = [torch.nonzero(keep_rows[b]).flatten() for b in range(bsz)]
    width = max(int(r.numel()) for r in rows)
    side = padding_side(sess.host_valid)
    index = torch.zeros(bsz, width, dtype=torch.long, device=visual.device)
    valid = torch.zeros(bsz, width, dtype=torch.bool, device=visual.device)
    for b, row in enumerate(rows):
        sl = slice(width - row.numel(), width) if side == "left" else slice(0, row.numel())
        index[b, sl] = row
        valid[b, sl] = sess.attention_2d[b, row]
        pad = width - row.numel()
        if pad:
            fill = torch.cat([torch.nonzero(~sess.attention_2d[b]).flatten(),
                              torch.nonzero(dropped[b]).flatten()])[:pad]
            index[b, slice(0, pad) if side == "left" else slice(row.numel(), width)] = fill
    ragged = any(int(r.numel()) != width for r in rows)
    return index, valid, dropped, ragged


def continue_in_llm(sess: Session, lay: Any, kept: list[torch.Tensor], index: torch.Tensor, valid: torch.Tensor) -> None:
    """Re-base the session on the shortened sequence so that in-LLM stages can prune it further.

    The decoder layers see ``[B, N']`` rows (``index`` of the original positions, ``valid`` real). The
    new layout holds the kept visual tokens at their shortened positions; ``sess.origin`` maps the LLM
    stages' selections back to the original visual tokens. ``seq_len`` stays N (decode steps map the
    full-length mask through ``pre_index``); ``llm_len`` becomes N'.
    """

    positions = []
    for b in range(lay.batch_size):
        orig = lay.positions[b][kept[b].to(lay.positions[b].device)].to(index.device)
        hit = (index[b][None, :] == orig[:, None]) & valid[b][None, :]
        positions.append(hit.float().argmax(dim=1))

    def take(field):
        return [t[k.to(t.device)] for t, k in zip(field, kept)]

    sess.origin = (lay, [k.clone() for k in kept])
    sess.layout = VisualLayout(positions, take(lay.image), take(lay.prunable), take(lay.source), take(lay.coords),
                               seq_len=int(index.shape[1]))
    sess.attention_2d = valid
    sess.query_pos = last_true(valid) - sess.appended  # appended tokens stay the last real ones
    sess.llm_len = int(index.shape[1])


def instruction_tokens(embeds: torch.Tensor, input_ids: torch.Tensor | None, host_valid: torch.Tensor,
                       host_kinds: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per sample the real tokens after its last visual token: embeddings ``[T_b, D]`` and ids ``[T_b]``.

    Which rows those are comes from the host copies of the validity and the token kinds (``[B, N]``), so
    only a gather runs on the device.
    """
    embs, ids = [], []
    n = host_kinds.shape[1]
    for b in range(host_kinds.shape[0]):
        vis = torch.nonzero(host_kinds[b] > 0).flatten()  # host tensors
        after = torch.arange(n) > (int(vis[-1]) if vis.numel() else -1)
        rows = torch.nonzero(after & host_valid[b]).flatten().to(embeds.device, non_blocking=True)
        embs.append(embeds[b, rows])
        if input_ids is not None:
            ids.append(input_ids[b, rows.to(input_ids.device)])
    return embs, (ids if input_ids is not None else None)


def shorten_decode_inputs(sess: Session, kwargs: dict[str, Any]) -> None:
    """Map a decode step's full-length attention mask onto the shortened sequence (positions: the adapter)."""
    mask = kwargs.get("attention_mask")
    n = sess.seq_len
    if is_prepared_mask(mask):  # generate()'s masks of a static cache (4D tensors or flex BlockMasks)
        kwargs["attention_mask"] = shortened_decode_mask(sess, query_length(kwargs))
        return
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError(
                f"after pre-LLM pruning vtprune needs a 2D or 4D attention_mask at decode, got {tuple(mask.shape)}"
            )
        head = compact(mask[:, :n], sess.pre_index).masked_fill(~sess.pre_valid, 0)
        kwargs["attention_mask"] = torch.cat([head, mask[:, n:]], dim=1)
    elif sess.pre_ragged:  # re-padded rows: the prefill had no mask, the decode steps need one
        kwargs["attention_mask"] = shortened_decode_mask(sess, query_length(kwargs))


def shortened_decode_mask(sess: Session, q_len: int) -> torch.Tensor:
    """A decode step's 2D mask ``[B, W + decoded + q]`` over the shortened prompt (``sess.pre_valid``) and the
    tokens decoded since (host counts). Replaces the 4D mask generate() built for the unshortened sequence
    of a static cache (the model builds its own from this one), and gives re-padded rows a mask where the
    prefill had none."""
    dev = sess.pre_valid.device
    tail = torch.ones(sess.pre_valid.shape[0], sess.decoded + q_len, dtype=torch.long, device=dev)
    return torch.cat([sess.pre_valid.long(), tail], dim=1)


def _with_tiles(signals: Signals, scorer: Any, adapter: Adapter, images: Any) -> Signals:
    """``signals`` with the tile-level signals a per-tile scorer reads (`Signals.tile_cls_attention`,
    ``tile_features``, ``tile_hidden_states``: every tile's whole grid, before the unpadding), each where it
    needs the per-token one, ``tile_first`` and ``tile_counts``."""
    if scorer.needs_signal(VISION_CLS_ATTENTION):
        signals.tile_cls_attention = adapter.vision_scores(images)  # [T, S]
    if scorer.needs_signal(VISION_FEATURES) or scorer.needs_signal(HIDDEN_STATES):
        features = adapter.merge_features(images)  # [T, S, C]
        if scorer.needs_signal(VISION_FEATURES):
            signals.tile_features = features
        if scorer.needs_signal(HIDDEN_STATES):  # the projector is row-wise: the padding rows' tokens too
            projector = adapter.merge_projector()
            weight = next(projector.parameters(), None)
            with torch.no_grad():
                signals.tile_hidden_states = projector(features if weight is None else features.to(weight.dtype))
    signals.tile_first = adapter.tile_first(images)
    signals.tile_counts = list(adapter.tiles_per_image(adapter.record_geometry_on_host(images.record),
                                                       images.record.n_images))
    return signals
