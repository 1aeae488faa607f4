"""VisionZip's model side: record the vision keys while the tower runs, merge contextual tokens before the LLM.

`vtprune.scorers.visionzip` decides which tokens are dominant, which are contextual targets, which
tokens merge into which target and in which order the kept slots are filled (a `ZipPlan`). This module
supplies what the plan needs from the model and writes the result into the embedding sequence that the
pre-LLM stage then shortens:

- Keys: a forward pre-hook on the attention module of the key layer (the scorer's ``vision_layer``, by
  default the adapter's feature layer) records the head-mean raw keys of each encoder call in
  ``VisionRecord.extras["vision_keys"]``: CLIP ``k_proj(h)`` ``[tiles, patches + 1, d]``; Qwen-VL
  the pre-RoPE ``k`` of the fused ``qkv`` ``[patches, d]`` (window order on Qwen2.5-VL), turned into one
  key per merged token (mean of its 2x2 group, raster order) when used.
- Merge space: LLaVA-1.5 / NeXT merge the vision features *before* the projector (the selected
  ``hidden_states`` of the encoder call, exactly what enters ``multi_modal_projector``) and project
  the contextual tokens; the projector acts per token, so this equals rewriting the projector's input at
  the target slots. Qwen-VL merges the merger outputs (the visual rows of the embeddings).
- Raster order: each contextual token is written at its target's slot, so the token count still matches
  the placeholders, and positions (1-D or M-RoPE) are the target's.
- Release order (LLaVA-1.5, the default there): the image's kept slots are then refilled with the
  release's sequence, its CLS token (the feature layer's CLS row, projected), its dominant patches, its
  contextual tokens (positions are contiguous, so only the order matters).
- Per tile (LLaVA-NeXT's default, `tile_merge`): the release's sequence over every tile's whole grid,
  built from the tile table (CLS, dominant and padding rows included) and projected here.

``generate(num_beams > 1)`` / ``num_return_sequences > 1`` expand the encoded images; the recorded keys
are expanded with them (`vtprune.adapters.base.match_record`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vtprune.runtime.stages import MethodStage, register_stage
from vtprune.scorers.base import Scorer, Signals
from vtprune.scorers.compose import host_of
from vtprune.scorers.visionzip import VisionZipScorer, contextual_tokens
from vtprune.signals import per_sample

if TYPE_CHECKING:
    from vtprune.adapters.base import Adapter
    from vtprune.state import PruneState, VisionRecord

KEYS = "vision_keys"


ENSEMBLE_ERROR = ("visionzip merges features into its contextual tokens, so it cannot be an ensemble member; "
                  "use it alone or under wrappers (e.g. 'debias+visionzip'), or use 'cls' inside the ensemble")


def recycling_host(scorer: Scorer) -> VisionZipScorer | None:
    """The VisionZip host under any wrappers (``debias+visionzip``), or None for every other scorer.

    Raises `ConfigError` for an ensemble with a VisionZip member: an ensemble only ranks tokens, so the
    member would silently lose its merge.
    """
    return host_of(scorer, VisionZipScorer, ENSEMBLE_ERROR)


@register_stage(VisionZipScorer)
class VisionZipStage(MethodStage):
    """VisionZip's runtime work: record the key layer's head-mean keys while the images are encoded, then
    select dominant + contextual tokens and merge before the LLM (`contextual_merge`)."""

    ensemble_error = ENSEMBLE_ERROR
    records_merge_features = True

    def hooks(self, adapter: Adapter, state: PruneState) -> list:
        return recycling_hooks(adapter, state)

    def pre_llm(self, adapter, state, images, signals, embeds, budget):
        from vtprune.scorers.select import Selection

        kept, embeds, contextual, per_image = contextual_merge(adapter, state, images, signals, embeds)
        return Selection.from_kept(signals.layout, kept, per_image=per_image), embeds, contextual, None


def _key_layer(adapter: Adapter, host: VisionZipScorer) -> int:
    return host.vision_layer if host.vision_layer is not None else adapter.default_vision_layer()


@torch.no_grad()
def head_mean_keys(attn: nn.Module, hidden: torch.Tensor, qwen: bool) -> torch.Tensor:
    """Raw keys (no RoPE), averaged over heads, float32.

    CLIP attention: ``hidden [T, N, C]`` -> ``k_proj`` -> ``[T, N, d]``. Qwen-VL vision attention:
    ``hidden [S, C]`` -> the ``k`` part of ``qkv`` -> ``[S, d]``.
    """
    if qwen:
        s = hidden.shape[0]
        return attn.qkv(hidden).reshape(s, 3, attn.num_heads, -1)[:, 1].float().mean(dim=1)
    t, n, _ = hidden.shape
    return attn.k_proj(hidden).view(t, n, attn.num_heads, attn.head_dim).float().mean(dim=2)


def recycling_hooks(adapter: Adapter, state: PruneState) -> list:
    """The key-recording hook when the scorer is VisionZip (possibly wrapped); no hook otherwise."""
    host = recycling_host(state.scorer)
    if host is None:
        return []
    module = adapter.vision_attention(_key_layer(adapter, host))
    qwen = adapter.vision_family == "qwen"

    def hook(mod, args, kwargs):
        extras = state.vision_extras
        if state.enabled and extras is not None:
            extras[KEYS] = head_mean_keys(mod, args[0] if args else kwargs["hidden_states"], qwen)
        return None

    return [module.register_forward_pre_hook(hook, with_kwargs=True)]


def _recorded(rec: VisionRecord, what: str) -> Any:
    value = rec.extras.get(what)
    if value is None:
        raise RuntimeError(
            "no vision keys were recorded for these images. The images must be encoded by this "
            "patched model (pass pixel inputs, or let generate() encode them)"
        )
    return value


def _gather(table: torch.Tensor, source: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rows of ``table [R, ...]`` per visual token via ``source`` (zeros where ``source`` is -1)."""
    out = []
    for src in source:
        src = src.to(table.device)
        rows = table[src.clamp(min=0)]
        out.append(torch.where((src >= 0).view(-1, *([1] * (rows.dim() - 1))), rows, torch.zeros_like(rows)))
    return out


def token_keys(adapter: Adapter, images: Any, source: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per sample ``[n_b, d]`` float32 keys of the visual tokens (Qwen-VL: group-mean keys)."""
    if not adapter.vision_family == "qwen":
        keys = _recorded(images.record, KEYS)  # [T, P + 1, d], rows like the CLS attention
        return _gather(keys.flatten(0, 1), source)
    m2 = adapter._merge() ** 2
    parts = []
    for rec in (images.record, images.video_record):  # the order of Adapter.vision_scores
        if rec is None:
            continue
        raw = _recorded(rec, KEYS)  # [patches, d], window order on Qwen2.5-VL
        groups = raw.view(-1, m2, raw.shape[-1]).mean(dim=1)
        parts.append(adapter._to_raster(groups, rec.geometry))
    return _gather(torch.cat(parts), source)


def vision_features(adapter: Adapter, images: Any, source: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per sample ``[n_b, C]`` vision features of the visual tokens as they enter the projector."""
    feats = adapter.merge_features(images)  # [T, P + 1, C]: CLS kept, rows like the keys
    return _gather(feats.flatten(0, 1), source)


def contextual_merge(
    adapter: Adapter, state: PruneState, images: Any, signals: Signals, embeds: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, list[int], list[list[int]]]:
    """Plan VisionZip's selection and write the contextual tokens (and, in release order, the CLS token
    and the release's order) into the embeddings.

    No host read on the way: sizes come from the layout's host-known spans and the budgets; only a scorer
    that may exclude tokens (``state.scorer.excludes``, e.g. ``debias+visionzip``) costs one read of the
    batch's finite counts (`plan_visionzip`).

    Args:
        signals: the pre-LLM signals (layout, CLS attention) of the prefill.
        embeds: ``[B, N, D]`` prompt embeddings with the visual features in place.

    Returns:
        Per sample the kept visual-token indices ``[k_b]`` (sorted), the embeddings with every kept slot
        holding what the plan puts there (``embeds`` itself when nothing changed), per sample the number
        of contextual tokens (included in the kept ones), and per sample the kept count of each image
        (host ints; contextual targets, CLS slots and non-prunable tokens included).
    """
    host = recycling_host(state.scorer)
    if host.per_tile:
        return tile_merge(adapter, host, images, signals, embeds)
    lay = signals.layout
    scores = per_sample(state.scorer.score(signals), lay)  # wrappers (sink, debias) act on the dominance scores
    keys = [k.to(p.device) for k, p in zip(token_keys(adapter, images, lay.source), lay.positions)]
    qwen = adapter.vision_family == "qwen"
    table, width, with_cls = None, 0, None
    if not qwen:
        tiles = adapter.merge_features(images)  # [T, P + 1, C], CLS rows kept
        table, width = tiles.flatten(0, 1), int(tiles.shape[1])
        with_cls = host.cls_images(lay, width - 1)
    plans = host.plan(scores, keys, lay, state.config.keep, excludes=state.scorer.excludes, with_cls=with_cls)
    if qwen:
        feats = [embeds[b, p] for b, p in enumerate(lay.positions)]
        project: Callable[[torch.Tensor], torch.Tensor] = nn.Identity()  # merger outputs: already LLM features
    else:
        feats = _gather(table, lay.source)
        project = adapter.merge_projector()
    out = embeds
    for b, plan in enumerate(plans):
        reorder = plan.cls_at.numel() > 0  # a shape: host-known
        if plan.members.numel() == 0 and not reorder:
            continue
        if out is embeds:
            out = embeds.clone()
        pos_b = lay.positions[b]
        if plan.members.numel():
            dev = feats[b].device
            ctx, merged = contextual_tokens(feats[b], plan.targets.to(dev), plan.members.to(dev), plan.slot.to(dev))
            pos = pos_b[plan.targets.to(pos_b.device)].to(out.device)
            # every target is written (a host-known count): the merged ones get their projected contextual
            # token, the others keep their embedding bit-exact
            new = project(ctx).to(out.device, out.dtype)
            out[b, pos] = torch.where(merged.to(out.device)[:, None], new, out[b, pos])
        if reorder:  # the release's sequence: each slot takes its token's final row, CLS slots the CLS token
            seq = plan.sequence.to(pos_b.device)
            rows = out[b, pos_b[seq].to(out.device)]  # a copy: the rows before the refill
            src = lay.source[b].to(seq.device)[seq.index_select(0, plan.cls_at.to(seq.device))]
            cls_rows = table.index_select(0, (src - src % width).to(table.device))  # the tile's CLS row
            rows.index_copy_(0, plan.cls_at.to(rows.device), project(cls_rows).to(rows.device, rows.dtype))
            out[b, pos_b[plan.kept.to(pos_b.device)].to(out.device)] = rows
    return [p.kept for p in plans], out, [int(p.targets.numel()) for p in plans], [p.per_image for p in plans]


def tile_merge(adapter: Adapter, host: VisionZipScorer, images: Any, signals: Signals, embeds: torch.Tensor
               ) -> tuple[list[torch.Tensor], torch.Tensor, list[int], list[list[int]]]:
    """`contextual_merge` per tile, the release's LLaVA-NeXT path (`VisionZipScorer.plan_tiles`): every image's
    release sequence (tile-table rows, contextual tokens merged before the projector, then projected) is
    written into ``tiles x keep`` of its slots in order; newlines are dropped. The slots: the dominant
    patches that have a token in the unpadded sequence hold theirs, the other rows take the image's last
    remaining tokens; every size is host-known, so nothing is read from the device. An image whose budget
    covers a tile, or whose sequence has fewer tokens than its rows, is kept whole."""
    lay = signals.layout
    rec = images.record
    cls_rows = adapter.vision_scores(images)  # [T, S]
    keys = _recorded(rec, KEYS)  # [T, S, d]
    table = adapter.merge_features(images)  # [T, S, C], CLS rows kept
    flat = table.flatten(0, 1)
    sizes = adapter.record_geometry_on_host(rec)
    counts = adapter.tiles_per_image(sizes, rec.n_images)
    grids = [adapter.tile_grid(size) for size in sizes]
    plans = host.plan_tiles(cls_rows, keys.to(cls_rows.device), counts, grids, signals.keep)
    spans = [sp for b in range(lay.batch_size) for sp in lay.spans[b]]  # per image, in call order
    owner = [b for b in range(lay.batch_size) for _ in lay.spans[b]]
    inverse = {}  # per sample: the visual token of each tile-table row (-1: none, e.g. the padding)
    project = adapter.merge_projector()
    out = embeds.clone()
    kept: list[list[torch.Tensor]] = [[] for _ in range(lay.batch_size)]
    per_image: list[list[int]] = [[] for _ in range(lay.batch_size)]
    contextual = [0] * lay.batch_size
    for plan, sp, b in zip(plans, spans, owner):
        pos_b = lay.positions[b]
        if plan is None or sp.n_candidates < int(plan.rows.numel()):  # kept whole
            kept[b].append(torch.arange(sp.start, sp.start + sp.length, device=pos_b.device))
            per_image[b].append(sp.length)
            continue
        if b not in inverse:
            src = lay.source[b].to(flat.device)
            inv = torch.full((flat.shape[0] + 1,), -1, dtype=torch.long, device=flat.device)  # last: a sink
            inv.scatter_(0, torch.where(src >= 0, src, flat.shape[0]), torch.arange(src.numel(), device=flat.device))
            inverse[b] = inv[:-1]
        own = inverse[b][plan.rows[plan.own].to(flat.device)]  # [P] the dominant patches' tokens, -1 in the padding
        cand = sp.candidates.to(own.device)
        taken = torch.zeros(int(pos_b.numel()) + 1, dtype=torch.long, device=own.device)
        taken[torch.where(own >= 0, own, pos_b.numel())] = 1
        # the slots: every dominant patch's own token first, then the image's last remaining tokens (top-L of
        # a priority with host-known L: no read of how many patches have a token)
        priority = taken[cand] * cand.numel() + torch.arange(cand.numel(), device=own.device)
        slots = torch.sort(cand[torch.topk(priority, int(plan.rows.numel())).indices]).values
        x = flat[plan.rows.to(flat.device)]
        targets = plan.rows[plan.ctx_at].to(flat.device)
        ctx, _ = contextual_tokens(flat, targets, plan.members.to(flat.device), plan.slot.to(flat.device))
        x = x.index_copy(0, plan.ctx_at.to(flat.device), ctx)
        rows = project(x).to(out.device, out.dtype)
        out[b, pos_b[slots.to(pos_b.device)].to(out.device)] = rows
        kept[b].append(slots.to(pos_b.device))
        per_image[b].append(int(plan.rows.numel()))
        contextual[b] += int(plan.ctx_at.numel())
    dev = lay.positions[0].device if lay.batch_size else embeds.device
    merged = [torch.cat(k) if k else torch.zeros(0, dtype=torch.long, device=dev) for k in kept]
    return merged, out, contextual, per_image
