"""Adapters for transformers' Qwen2-VL, Qwen2.5-VL and Qwen3-VL (images and videos, M-RoPE).

Layout. Every image and every video is one *item* of the layout: its tokens are the merged tokens of its
``(t, h, w)`` patch grid, ``t * h * w / 4`` of them in raster order per temporal step, with coords
``(temporal step, row, col)`` on the merged grid. The budget ``keep`` applies per item, so a video gets
``keep`` tokens for all its frames together (a float keeps that fraction of the video), chosen where the
scores are highest, whatever the frame.

Positions. Kept tokens keep their original 3-D M-RoPE positions, in both stages. In-LLM pruning needs
nothing more (generate() computes positions on the full prompt). Pre-LLM pruning computes the positions of
the full prompt, gathers the kept columns, and sets the model's ``rope_deltas`` so that decode steps
without explicit positions continue exactly as in the unpruned model.

Vision-side scores. Qwen's towers have no CLS token. The stand-in (the ``vision_cls_attention`` signal)
is the attention each patch *receives* in a full-attention block (mean over heads and over the queries of
its image or frame), recomputed from q and k blockwise, averaged over each 2x2 merge group, and mapped
from Qwen2.5-VL's window order back to raster order. Pre-LLM pruning therefore selects whole merge
groups, never single patches.

Vision features. The ``vision_features`` signal is each merged token's merger-MLP input (its 2x2 patches
of the last block's output after the merger's norm, concatenated, raster order), recorded by a hook on
the norm of the merger whose outputs enter the LLM; `feature_projector` is that merger's MLP, so the two
reproduce the visual embeddings exactly.

Qwen3-VL deepstack. Its first decoder layers add features from intermediate vision layers at the visual
positions. In-LLM pruning must come after them: ``layer >= len(deepstack_visual_indexes)`` (the default
layer moves there; an explicit smaller layer is refused). Pre-LLM pruning gathers the deepstack features
of the kept tokens and hands them to the language model with the shortened visual mask.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vtprune.adapters.attention_rows import vit_global_context, vit_received_attention
from vtprune.adapters.base import (
    Adapter,
    ImageTokens,
    UnsupportedModelError,
    build_layout,
    match_record,
    register_adapter,
)
from vtprune.kernels import compact
from vtprune.layout import VisualLayout
from vtprune.signals import VISION_FEATURES
from vtprune.state import PruneState, Session, VisionRecord

IMAGE, VIDEO = 1, 2  # token kinds (index + 1 into visual_token_ids)
MERGER_INPUT = "qwen_merger_input"  # VisionRecord.extras: [merged tokens, 4 C] the merger MLP's input


@dataclass
class QwenInputs:
    """The images and videos of one prefill call (pixels, or the outputs generate() already encoded)."""

    pixel_values: torch.Tensor | None
    pixel_values_videos: torch.Tensor | None
    image_grid_thw: torch.Tensor | None  # [n_images, 3]
    video_grid_thw: torch.Tensor | None  # [n_videos, 3]
    record: VisionRecord | None  # image encoding
    video_record: VisionRecord | None


def window_order(grid_thw: torch.Tensor, merge: int, window: int, patch: int) -> torch.Tensor:
    """Qwen2.5-VL's window permutation of merged tokens: ``[M]`` long, ``order[i]`` = raster index of the
    merged token at window position ``i``.

    Windows are ``window // merge // patch`` merged tokens on a side (the last ones clipped at the
    border), visited in raster order per temporal step; tokens inside a window in raster order. Items
    (images, videos) follow each other.
    """
    side = window // merge // patch
    out, offset = [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).view(t, gh, gw)
        for ti in range(t):
            for r0 in range(0, gh, side):
                for c0 in range(0, gw, side):
                    out.append(idx[ti, r0:r0 + side, c0:c0 + side].flatten() + offset)
        offset += t * gh * gw
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


class _QwenFamily(Adapter):
    encoders = {"image": "get_image_features", "video": "get_video_features"}
    vision_family = "qwen"
    geometry_keys = ("image_grid_thw", "video_grid_thw")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        core = self.require_core("visual", "Qwen*VLForConditionalGeneration")
        if not hasattr(core.visual, "blocks"):
            raise UnsupportedModelError(f"the vision tower {type(core.visual).__name__} has no blocks")

    # ---- structure ------------------------------------------------------------------------------
    def visual_token_ids(self) -> list[int]:
        return [self.image_token_id(), int(self.model.config.video_token_id)]

    def _merge(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    def full_attention_blocks(self) -> list[int]:
        """0-based vision blocks whose attention spans a whole image (or frame)."""
        return list(range(len(self.core().visual.blocks)))

    def vision_attention(self, layer: int) -> nn.Module:
        blocks = self.core().visual.blocks
        n = len(blocks)
        h = layer + n + 1 if layer < 0 else layer
        full = [b + 1 for b in self.full_attention_blocks()]
        if not 1 <= h <= n or h not in full:
            raise ValueError(
                f"vision_layer={layer} is not usable on this {n}-block vision tower: give the hidden_states "
                f"index of a full-attention block's output: one of {full} (or negative from the end)"
            )
        return blocks[h - 1].attn

    def default_vision_layer(self) -> int:
        return self.full_attention_blocks()[-1] + 1

    # ---- the call's images and videos -------------------------------------------------------------
    def image_inputs(self, state: PruneState, kwargs: dict[str, Any]) -> QwenInputs:
        enc = kwargs.get("mm_encoder_outputs") or {}
        grids, records = {}, {}
        for modality, pixels_key, grid_key, last in (
            ("image", "pixel_values", "image_grid_thw", state.vision_record),
            ("video", "pixel_values_videos", "video_grid_thw", state.video_record),
        ):
            grids[modality] = kwargs.get(grid_key)
            records[modality] = None
            if enc.get(modality) is not None and kwargs.get(pixels_key) is None:
                records[modality] = match_record(state, last, enc[modality], modality)
                grids[modality] = records[modality].geometry
        return QwenInputs(kwargs.get("pixel_values"), kwargs.get("pixel_values_videos"), grids["image"],
                          grids["video"], records["image"], records["video"])

    def record_geometry(self, modality: str, bound: dict[str, Any]) -> Any:
        return bound.get("video_grid_thw" if modality == "video" else "image_grid_thw")

    def host_geometry(self, modality: str, bound: dict[str, Any]) -> Any:
        grid = self.record_geometry(modality, bound)
        return self.host_of(grid) if isinstance(grid, torch.Tensor) else grid

    def tiles_per_image(self, geometry: Any, n_images: int) -> list[int]:
        # one recorded score row per merged token
        return [int(t * h * w) // self._merge() ** 2 for t, h, w in self.host_of(geometry).tolist()]

    def _item_tokens(self, grid: torch.Tensor, offset: int) -> ImageTokens:
        m = self._merge()
        t, h, w = (int(x) for x in grid.tolist())
        gh, gw = h // m, w // m
        n = t * gh * gw
        r = torch.arange(n)
        coords = torch.stack([r // (gh * gw), (r % (gh * gw)) // gw, r % gw], dim=1)
        return ImageTokens(offset + r, coords, torch.ones(n, dtype=torch.bool))

    def build_layout(self, images: QwenInputs, kinds: torch.Tensor, device: torch.device) -> VisualLayout:
        pools = {}
        offset = 0
        for kind, grid, name in ((IMAGE, images.image_grid_thw, "image"), (VIDEO, images.video_grid_thw, "video")):
            items = []
            if grid is not None:
                for g in self.host_of(torch.as_tensor(grid)):  # one host read of the grid (geometry)
                    items.append(self._item_tokens(g, offset))
                    offset += int(items[-1].source.numel())
            pools[kind] = (items, name)
        ordered, used = [], {IMAGE: 0, VIDEO: 0}
        for b in range(kinds.shape[0]):
            seq = kinds[b][kinds[b] > 0].tolist()
            i = 0
            while i < len(seq):
                kind = seq[i]
                items, name = pools[kind]
                if used[kind] >= len(items):
                    raise ValueError(
                        f"sample {b} holds more <|{name}_pad|> tokens than the {name}s given cover; pass "
                        f"{name}_grid_thw / pixel inputs from the same processor call as input_ids"
                    )
                item = items[used[kind]]
                n = int(item.source.numel())
                if seq[i:i + n] != [kind] * n:
                    raise ValueError(
                        f"the {name} tokens of sample {b} do not line up with the {name} grid sizes "
                        f"({name}_grid_thw); let the processor expand the placeholders"
                    )
                ordered.append(item)
                used[kind] += 1
                i += n
        for kind, (items, name) in pools.items():
            if used[kind] != len(items):
                raise ValueError(f"{len(items)} {name}s were given but the prompts hold placeholders for {used[kind]}")
        return build_layout(kinds > 0, ordered, device)

    # ---- encoding and features ------------------------------------------------------------------
    def ensure_encoded(self, state: PruneState, images: QwenInputs) -> None:
        core = self.core()
        if images.record is None and images.pixel_values is not None:
            core.get_image_features(images.pixel_values, images.image_grid_thw, return_dict=True)
            images.record = state.vision_record
        if images.video_record is None and images.pixel_values_videos is not None:
            core.get_video_features(images.pixel_values_videos, images.video_grid_thw, return_dict=True)
            images.video_record = state.video_record

    def merge_visual_features(self, images: QwenInputs, embeds: torch.Tensor, kinds: torch.Tensor,
                              host_kinds: torch.Tensor | None = None) -> torch.Tensor:
        for kind, rec, name in ((IMAGE, images.record, "image"), (VIDEO, images.video_record, "video")):
            mask = kinds == kind
            n_tokens = int(((kinds if host_kinds is None else host_kinds) == kind).sum())
            if rec is None:
                if n_tokens:
                    raise ValueError(f"the prompts hold {n_tokens} {name} tokens but no {name} input was given")
                continue
            feat = torch.cat(list(rec.output.pooler_output), dim=0).to(embeds.device, embeds.dtype)
            if feat.shape[0] != n_tokens:
                raise ValueError(
                    f"the prompts hold {n_tokens} {name} tokens but the {name}s produce {feat.shape[0]} features; "
                    "let the model's processor build input_ids and the pixel inputs together"
                )
            embeds = embeds.masked_scatter(mask[..., None].expand_as(embeds), feat)
        return embeds

    def vision_scores(self, images: QwenInputs) -> torch.Tensor:
        parts = []
        for rec, name in ((images.record, "image"), (images.video_record, "video")):
            if rec is None:
                continue
            if rec.cls_attention is None:
                raise RuntimeError(f"no vision attention was recorded while the {name}s were encoded")
            parts.append(rec.cls_attention.flatten())
        return torch.cat(parts)

    # ---- vision-side scores: attention received in full-attention blocks -------------------------
    def _segments(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | list[int]:
        """The full-attention segments (images or frames) of a vision attention call, as patch bounds."""
        grid = self.encoding_geometry
        if grid is not None:  # the full-attention segments (frames) from the host grid: no device read
            bounds = [0]
            for t, h, w in grid.tolist():
                bounds += [bounds[-1] + (f + 1) * h * w for f in range(t)]
            return bounds
        return kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)

    def vision_score_row(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        hidden = args[0] if args else kwargs["hidden_states"]
        return vit_received_attention(module, hidden, self._segments(args, kwargs), kwargs["position_embeddings"])

    def vision_layer_scores(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """``[merged tokens, 1]`` (raster order, like ``cls_attention``): one full-attention block's received
        attention, averaged over each 2x2 merge group."""
        groups = self.vision_score_row(module, args, kwargs).view(-1, self._merge() ** 2).mean(dim=1)
        return self._to_raster(groups, self.encoding_geometry)[:, None]

    def vision_context_rows(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], t: float) -> torch.Tensor:
        """``[merged tokens, 1]`` (raster order, like ``cls_attention``): the per-patch context relevance of a
        full-attention block (`vit_global_context`: global tokens per image or frame), averaged over each 2x2
        merge group."""
        hidden = args[0] if args else kwargs["hidden_states"]
        patches = vit_global_context(module, hidden, self._segments(args, kwargs), kwargs["position_embeddings"], t)
        groups = patches.view(-1, self._merge() ** 2).mean(dim=1)
        return self._to_raster(groups, self.encoding_geometry)[:, None]

    def finish_vision_scores(self, modality: str, summed: torch.Tensor, bound: dict[str, Any]) -> torch.Tensor:
        groups = summed.view(-1, self._merge() ** 2).mean(dim=1)  # one score per merged token
        grid = bound.get("video_grid_thw" if modality == "video" else "image_grid_thw")
        return self._to_raster(groups, grid)[:, None]

    def _to_raster(self, groups: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return groups

    # ---- the merger: the projector of the vision_features signal ---------------------------------
    def _merger_parts(self) -> tuple[nn.Module, nn.Module]:
        """``(norm, mlp)`` of the merger whose outputs enter the LLM (not Qwen3-VL's deepstack mergers): the
        merger computes ``mlp(norm(x).view(-1, 4 C))`` from the last block's output ``x`` ``[patches, C]``."""
        merger = self.core().visual.merger
        if hasattr(merger, "mlp"):  # Qwen2-VL, Qwen2.5-VL: ln_q, then mlp
            return merger.ln_q, merger.mlp
        if getattr(merger, "use_postshuffle_norm", False):  # Qwen3-VL's main merger norms each patch first
            raise UnsupportedModelError("the merger normalises the concatenated patches; vtprune expects one norm per patch")
        return merger.norm, nn.Sequential(merger.linear_fc1, merger.act_fn, merger.linear_fc2)

    def feature_projector(self) -> nn.Module:
        """The merger's MLP (shared parameters): ``[..., 4 C] -> [..., D]``, row-wise."""
        return self._merger_parts()[1]

    def merge_features(self, images: QwenInputs) -> torch.Tensor:
        """``[merged tokens, 1, 4 C]``: each merged token's merger-MLP input (its 2x2 patches of the last
        block's output, each after the merger's norm, concatenated), raster order, the images then the
        videos of the call (the rows of `vision_scores`). Recorded while encoding (`extra_hooks`)."""
        parts = []
        for rec, name in ((images.record, "image"), (images.video_record, "video")):
            if rec is None:
                continue
            feats = rec.extras.get(MERGER_INPUT)
            if feats is None:
                raise RuntimeError(f"the merger input was not recorded while the {name}s were encoded")
            parts.append(self._to_raster(feats, rec.geometry))
        return torch.cat(parts)[:, None]

    def _merger_input_hook(self, state: PruneState):
        width = self._merge() ** 2

        def hook(module, args, output):
            extras = state.vision_extras
            if state.enabled and extras is not None:
                extras[MERGER_INPUT] = output.reshape(-1, width * output.shape[-1])  # the merger's own view
            return None

        return hook

    def extra_hooks(self, state: PruneState, features: bool = False) -> list:
        # ``features`` (VisionZip) merges the merger *outputs* on Qwen-VL: only vision_features needs the input
        if not state.scorer.needs_signal(VISION_FEATURES):
            return []
        return [self._merger_parts()[0].register_forward_hook(self._merger_input_hook(state))]

    # ---- positions ------------------------------------------------------------------------------
    def _full_positions(self, original: dict[str, Any]) -> torch.Tensor:
        """``[3, B, N]`` M-RoPE positions of the unpruned prompt."""
        pos = original.get("position_ids")
        if pos is not None:
            if pos.dim() != 3 or pos.shape[0] not in (3, 4):
                raise ValueError(
                    f"Qwen-VL needs 3-D position_ids [3 or 4, batch, seq] at prefill, got {tuple(pos.shape)}"
                )
            return pos[-3:]
        core = self.core()
        if original.get("input_ids") is None or original.get("mm_token_type_ids") is None:
            raise ValueError(
                "pre-LLM pruning on Qwen-VL needs input_ids and the processor's mm_token_type_ids (or explicit "
                "3-D position_ids) to compute the M-RoPE positions of the full prompt; pass the processor outputs"
            )
        args = dict(original, past_key_values=None, cache=None)
        params = inspect.signature(core.compute_3d_position_ids).parameters
        pos = core.compute_3d_position_ids(**{k: v for k, v in args.items() if k in params})
        return pos[-3:]

    def mutable_state(self) -> list[tuple[Any, str]]:
        return [(self.core(), "rope_deltas")]  # set for the shortened cache by `shortened_positions`

    def shortened_positions(self, sess: Session, original: dict[str, Any], kwargs: dict[str, Any],
                            dropped: torch.Tensor) -> None:
        full = self._full_positions(original)  # [3, B, N]
        index, valid = sess.pre_index, sess.pre_valid
        bsz = index.shape[0]
        full = full.expand(3, bsz, -1)
        kept = full.gather(2, index[None].expand(3, -1, -1).to(full.device))
        kept = kept.masked_fill(~valid[None].to(kept.device), 0)
        # 3 rows only: the text row would have gaps, which the mask builder would read as packed sequences
        kwargs["position_ids"] = kept
        nxt = kept.amax(dim=(0, 2))[:, None] + 1  # [B, 1]: the first position after the prompt
        sess.next_position = nxt
        # the unpruned model's deltas (relative to the full prompt's real tokens): what generate() adds to
        # its full-length text positions when it restarts from this cache (`_prepare_position_ids_for_generation`)
        real = (valid.sum(1, keepdim=True) + dropped.sum(1, keepdim=True)).to(kept.device)
        self.core().rope_deltas = nxt - real

    def decode_positions(self, sess: Session, kwargs: dict[str, Any]) -> None:
        """Explicit positions (generate's) are already those of the unpruned prompt; without them the model
        would count the (shortened) cache, so the step gets the positions after the prompt's last one."""
        if kwargs.get("position_ids") is not None or sess.next_position is None:
            return
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if tokens is None:
            return
        q = int(tokens.shape[1])
        ref = sess.next_position
        steps = torch.arange(sess.decoded, sess.decoded + q, device=ref.device)
        kwargs["position_ids"] = (ref + steps[None]).unsqueeze(0).expand(3, -1, -1)

    def strip_image_inputs(self, kwargs: dict[str, Any]) -> None:
        for key in ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw",
                    "mm_encoder_outputs", "mm_token_type_ids", "second_per_grid_ts"):
            kwargs.pop(key, None)


@register_adapter
class Qwen2VLAdapter(_QwenFamily):
    """Qwen2-VL (`Qwen2VLForConditionalGeneration`): every vision block is full attention."""

    model_types = ("qwen2_vl",)
    description = "Qwen2-VL (Qwen2VLForConditionalGeneration)"


@register_adapter
class Qwen25VLAdapter(_QwenFamily):
    """Qwen2.5-VL: window attention except in ``fullatt_block_indexes``; tokens travel in window order."""

    model_types = ("qwen2_5_vl",)
    description = "Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)"

    def full_attention_blocks(self) -> list[int]:
        return sorted(self.model.config.vision_config.fullatt_block_indexes)

    def _to_raster(self, groups: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        vc = self.model.config.vision_config
        order = window_order(self.host_of(grid), vc.spatial_merge_size, vc.window_size, vc.patch_size)
        order = order.to(groups.device, non_blocking=True)
        out = torch.empty_like(groups)
        out[order] = groups
        return out


@register_adapter
class Qwen3VLAdapter(_QwenFamily):
    """Qwen3-VL: deepstack features enter the first decoder layers at the visual positions."""

    model_types = ("qwen3_vl",)
    description = "Qwen3-VL (Qwen3VLForConditionalGeneration)"

    def min_layer(self) -> int:
        return len(self.model.config.vision_config.deepstack_visual_indexes)

    def min_layer_reason(self, layer: int) -> str:
        n = self.min_layer()
        return (
            f"layer={layer} is too early for Qwen3-VL: its deepstack step adds vision features to the visual "
            f"tokens after decoder layers 0..{n - 1}, so in-LLM pruning must come after them: use layer >= {n} "
            "(or a pre-LLM method, which carries the deepstack features of the kept tokens)"
        )

    def after_shortening(self, state: PruneState, images: QwenInputs, visual: torch.Tensor,
                         dropped: torch.Tensor) -> None:
        sess = state.session
        levels = None
        for kind, rec in ((IMAGE, images.record), (VIDEO, images.video_record)):
            if rec is None:
                continue
            feats = [torch.cat(list(level), dim=0) for level in rec.output.deepstack_features]
            if levels is None:
                levels = [[] for _ in feats]
            for i, f in enumerate(feats):
                levels[i].append((kind, f))
        if levels is None:
            return
        joint_kinds = sess.kinds[visual]
        keep_rows = ~dropped[visual]
        embeds = []
        for parts in levels:
            dim = parts[0][1].shape[-1]
            joint = parts[0][1].new_zeros(int(visual.sum()), dim)
            for kind, f in parts:
                joint[joint_kinds == kind] = f.to(joint.device, joint.dtype)
            embeds.append(joint[keep_rows])
        short_visual = compact(visual & ~dropped, sess.pre_index) & sess.pre_valid
        sess.deepstack = (short_visual, embeds)

    def extra_hooks(self, state: PruneState, features: bool = False) -> list:
        handles = super().extra_hooks(state, features)

        def hook(module, args, kwargs):
            sess = state.session
            pending = sess.deepstack
            if pending is None or sess.phase != "prefill":
                return None
            kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"] = pending
            sess.deepstack = None
            return args, kwargs

        return [*handles, self.core().language_model.register_forward_pre_hook(hook, with_kwargs=True)]
