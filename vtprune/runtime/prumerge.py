"""PruMerge's model side: record the key layer's attention and keys while the tower runs, merge before the LLM.

`vtprune.scorers.prumerge` decides which tokens are kept (the adaptive outliers, PruMerge+'s samples) and
how they merge. This module supplies what that needs from the model and writes the merged features into
the embedding sequence that the pre-LLM stage then shortens:

- A forward pre-hook on the attention module of the key layer (`PruMergeScorer.key_layer`) records, per
  encoder call, the full-width raw keys in ``VisionRecord.extras`` under VisionZip's key name (so
  `vtprune.runtime.visionzip.token_keys` maps them onto the visual tokens): CLIP ``k_proj(h)``
  ``[tiles, patches + 1, C]``; Qwen-VL the pre-RoPE ``k`` of the fused ``qkv``, heads concatenated,
  ``[patches, C]`` (grouped per merged token when used). On CLIP towers it also records the release's CLS
  attention ``softmax(q_proj(h_cls) . k_proj(h)^T / sqrt(C))`` ``[tiles, patches + 1]``; Qwen-VL uses
  vtprune's ``vision_cls_attention`` of the same layer.
- Merge space, as VisionZip's (`vtprune.runtime.visionzip`): LLaVA-1.5 / NeXT merge the vision features
  entering the projector and project the merged rows; Qwen-VL merges the merger outputs.
- Merged features are written at the kept tokens' own slots (the extra token at its slot), so the token
  count matches the placeholders and positions (1-D or M-RoPE) are the slots' own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vtprune.runtime.stages import CONTEXTUAL, MethodStage, register_stage
from vtprune.runtime.visionzip import KEYS, _gather, token_keys, vision_features
from vtprune.scorers.base import VISION_CLS_ATTENTION, Signals
from vtprune.scorers.prumerge import (
    ATTENTION,
    PruMergeScorer,
    merged_tokens,
    plan_prumerge,
    remainder_token,
)
from vtprune.signals import per_sample

if TYPE_CHECKING:
    from vtprune.adapters.base import Adapter
    from vtprune.state import PruneState

CLS_ATTENTION = "prumerge_cls_attention"  # VisionRecord.extras: [tiles, patches + 1] the release's CLS row


@torch.no_grad()
def full_width_keys(attn: nn.Module, hidden: torch.Tensor, qwen: bool) -> torch.Tensor:
    """Raw keys (no RoPE), heads concatenated, float32: CLIP ``[T, N, C]`` -> ``[T, N, C]``; Qwen-VL
    ``[S, C]`` -> ``[S, C]`` (the ``k`` part of ``qkv``)."""
    if qwen:
        s = hidden.shape[0]
        return attn.qkv(hidden).reshape(s, 3, -1)[:, 1].float()
    return attn.k_proj(hidden).float()


@torch.no_grad()
def release_cls_attention(attn: nn.Module, hidden: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """PruMerge's CLS attention ``[T, N]`` float32 from a CLIP layer's input ``hidden`` ``[T, N, C]`` and its
    full-width keys ``[T, N, C]``: one softmax over ``q_proj(h_cls) . k / sqrt(C)`` (heads not split)."""
    q = attn.q_proj(hidden[:, :1]).float()  # [T, 1, C]
    logits = (q @ keys.transpose(1, 2))[:, 0] * keys.shape[-1] ** -0.5
    return torch.softmax(logits, dim=-1)


@register_stage(PruMergeScorer)
class PruMergeStage(MethodStage):
    """PruMerge's runtime work: record the key layer's attention and keys while the images are encoded, then
    select the adaptive tokens and merge their neighbours before the LLM (`prumerge_merge`)."""

    ensemble_error = ("prumerge merges features into its kept tokens, so it cannot be an ensemble member; "
                      "use it alone, or use 'cls' inside the ensemble")
    records_merge_features = True

    def hooks(self, adapter: Adapter, state: PruneState) -> list:
        module = adapter.vision_attention(self.host.key_layer(adapter))
        qwen = adapter.vision_family == "qwen"

        def hook(mod, args, kwargs):
            extras = state.vision_extras
            if state.enabled and extras is not None:
                hidden = args[0] if args else kwargs["hidden_states"]
                keys = full_width_keys(mod, hidden, qwen)
                extras[KEYS] = keys
                if not qwen:
                    extras[CLS_ATTENTION] = release_cls_attention(mod, hidden, keys)
            return None

        return [module.register_forward_pre_hook(hook, with_kwargs=True)]

    def pre_llm(self, adapter, state, images, signals, embeds, budget):
        from vtprune.scorers.select import Selection

        kept, embeds, slots, per_image = prumerge_merge(adapter, state, self.host, images, signals, embeds, budget)
        state.session.extras[CONTEXTUAL] = slots
        return Selection.from_kept(signals.layout, kept, per_image=per_image), embeds, \
            [int(s.numel()) for s in slots], None


def merge_attention(adapter: Adapter, images: Any, signals: Signals) -> list[torch.Tensor]:
    """Per sample ``[n_b]`` float32 attention of the visual tokens (the merge weights and the outlier test)."""
    lay = signals.layout
    if adapter.vision_family == "qwen":
        return [a.float() for a in signals.require(VISION_CLS_ATTENTION)]
    rows = images.record.extras.get(CLS_ATTENTION) if images.record is not None else None
    if rows is None:
        raise RuntimeError("prumerge: no attention was recorded for these images. The images must be encoded by "
                           "this patched model (pass pixel inputs, or let generate() encode them)")
    return [a.to(p.device) for a, p in zip(_gather(rows.flatten(), lay.source), lay.positions)]


def prumerge_merge(
    adapter: Adapter, state: PruneState, host: PruMergeScorer, images: Any, signals: Signals,
    embeds: torch.Tensor, budget: Any,
) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor], list[list[int]]]:
    """Select PruMerge's tokens and write their merged features into the embeddings.

    One host read per prefill (the adaptive counts of the pruned images, `plan_prumerge`); every other
    size comes from the layout's host-known spans and those counts.

    Args:
        signals: the pre-LLM signals (layout; Qwen-VL: the CLS-type attention) of the prefill.
        embeds: ``[B, N, D]`` prompt embeddings with the visual features in place.

    Returns:
        Per sample the kept visual-token indices (sorted), the embeddings with merged features at the merged
        slots (``embeds`` itself when nothing merged), per sample the merged slots (sorted visual indices)
        and the kept count of each image (host ints).
    """
    lay = signals.layout
    attention = merge_attention(adapter, images, signals)
    signals.extras[ATTENTION] = attention
    scores = per_sample(state.scorer.score(signals), lay)
    plans = plan_prumerge(scores, lay, budget, host.extra_token, excludes=state.scorer.excludes)
    if not any(p.images for p in plans):  # keep-all: nothing to merge
        return [p.kept for p in plans], embeds, [p.slots for p in plans], [p.per_image for p in plans]
    keys = [k.to(p.device) for k, p in zip(token_keys(adapter, images, lay.source), lay.positions)]
    if adapter.vision_family == "qwen":
        feats = [embeds[b, p] for b, p in enumerate(lay.positions)]
        project: Callable[[torch.Tensor], torch.Tensor] = nn.Identity()  # merger outputs: already LLM features
    else:
        feats = vision_features(adapter, images, lay.source)
        project = adapter.merge_projector()
    out = embeds.clone()
    for b, plan in enumerate(plans):
        for im in plan.images:
            dev = feats[b].device
            cand = im.candidates.to(dev)
            x, a, main = feats[b][cand], attention[b].to(dev)[cand], im.main.to(dev)
            rows = [merged_tokens(x, keys[b].to(dev)[cand], a, main, host.neighbours)]
            where = [cand[main]]
            if im.extra.numel():  # host-known shape
                rows.append(remainder_token(x, a, main)[None])
                where.append(cand[im.extra.to(dev)])
            new = project(torch.cat(rows).to(x.dtype)).to(out.device, out.dtype)
            pos = lay.positions[b][torch.cat(where).to(lay.positions[b].device)].to(out.device)
            out[b, pos] = new
    return [p.kept for p in plans], out, [p.slots for p in plans], [p.per_image for p in plans]
