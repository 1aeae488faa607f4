"""Adapter for the original LLaVA codebase (haotian-liu/LLaVA, ``llava.model.LlavaLlamaForCausalLM``).

The repository builds the LLM input itself: ``prepare_inputs_labels_for_multimodal`` encodes the
images (``encode_images``: its ``CLIPVisionTower`` wrapper, then ``mm_projector``), splices each image's
features in place of its one ``IMAGE_TOKEN_INDEX`` (-200) placeholder, drops the padding and re-pads
the batch (right by default, ``config.tokenizer_padding_side``). The language model
(``model.model``, a ``LlamaModel``) then receives only ``inputs_embeds``.

vtprune wraps that method on the instance (no fork, no source change) and calls it with probe labels:
text tokens get label 0, and the method itself marks every spliced feature row ``IGNORE_INDEX``, so
the rows it returns as ``IGNORE_INDEX`` on real (unpadded) positions are exactly the visual tokens,
whatever the padding side, the truncation to ``tokenizer_model_max_length`` or the number of images.
The caller's own labels, if any, are moved to their new positions. That wrapping is the runtime's
(`vtprune.runtime.llava_repo`); everything after it (pre-LLM shortening, in-LLM dropping after layer K,
the decode steps) is the shared runtime, running on the repository's ``LlamaModel`` under transformers
4.37 (its pin) or 5.x. This module only describes the model.

Supported: LLaVA-1.5-style checkpoints (``mm_patch_merge_type="flat"``, ``mm_vision_select_feature``
``"patch"`` or ``"cls_patch"``, any number of images per prompt), every LLaVA-family method: VisionZip
merges in the tower's feature-layer space, recorded by a forward hook on its ``CLIPVisionModel``, and
projects through ``mm_projector``; FlowCut's vision stage hooks the ``CLIPVisionModel``'s layers
(`vision_encoder`); methods with LLM stages after a pre-LLM one (VFlowOpt) run those stages on the prompt
shortened in ``prepare_inputs_labels_for_multimodal``. Not supported: LLaVA-1.6 checkpoints of the repository
(``spatial_unpad`` anyres packing; use transformers' LLaVA-NeXT), and the MPT and Mistral variants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vtprune.adapters.base import (
    Adapter,
    ImageInputs,
    ImageTokens,
    UnsupportedModelError,
    register_adapter,
    transformers_version,
)
from vtprune.adapters.llava import clip_layer_attention
from vtprune.perthread import PerThread
from vtprune.signals import VISION_FEATURES
from vtprune.state import PruneState, VisionRecord

IMAGE_TOKEN_INDEX = -200  # llava.constants.IMAGE_TOKEN_INDEX
IGNORE_INDEX = -100  # llava.constants.IGNORE_INDEX
FEATURE_HIDDEN = "feature_hidden"  # VisionRecord.extras key: the tower's feature-layer hidden states (VisionZip)


@dataclass
class RepoPrefill:
    """What one ``prepare_inputs_labels_for_multimodal`` call produced, for the LLM forward that follows.

    - ``embeds``: ``[B, N, D]`` the returned ``inputs_embeds`` (matched by storage at the LLM forward).
    - ``visual``: ``[B, N]`` bool, True on spliced image-feature rows.
    - ``tiles``: per image of the call, how many vision-tower crops it was encoded as (1 for LLaVA-1.5).
    - ``record``: the `VisionRecord` of the call's ``encode_images`` run.
    """

    embeds: torch.Tensor
    visual: torch.Tensor
    tiles: list[int]
    record: VisionRecord | None


def tiles_per_image(images: Any) -> list[int]:
    """The crops each image is encoded as, following ``prepare_inputs_labels_for_multimodal``'s own split."""
    if isinstance(images, (list, tuple)):
        return [1 if x.ndim == 3 else int(x.shape[0]) for x in images]
    if images.ndim == 5:
        return [int(images.shape[1])] * int(images.shape[0])
    return [1] * int(images.shape[0])


def moved_labels(labels: torch.Tensor, input_ids: torch.Tensor, mask_in: torch.Tensor,
                 probe_out: torch.Tensor, mask_out: torch.Tensor) -> torch.Tensor:
    """The caller's ``labels`` ``[B, N]`` at the positions their text tokens have after splicing ``[B, N2]``."""
    out = torch.full_like(probe_out, IGNORE_INDEX)
    for b in range(labels.shape[0]):
        text_in = mask_in[b] & (input_ids[b] != IMAGE_TOKEN_INDEX)
        slots = torch.nonzero((probe_out[b] != IGNORE_INDEX) & mask_out[b]).flatten()
        out[b, slots] = labels[b][text_in][: slots.numel()].to(out.dtype)
    return out


@register_adapter
class LlavaRepoAdapter(Adapter):
    """LLaVA-1.5 of the original LLaVA repository (``LlavaLlamaForCausalLM``, model type ``llava_llama``)."""

    model_types = ("llava_llama",)
    description = "LLaVA-1.5 of the original LLaVA codebase (llava.model.LlavaLlamaForCausalLM)"
    encoders = {"image": "encode_images"}
    min_transformers = "4.37"  # the repository's pin; also runs on 5.x
    # per-call, per thread: the prefill prepared in prepare_inputs_labels_for_multimodal for the LLM
    # forward that follows, and the one that forward is running
    _pending = PerThread()
    _current = PerThread()

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        version = transformers_version()
        if (4, 38) <= version[:2] < (5, 0):
            import transformers

            raise UnsupportedModelError(
                f"the LLaVA-repository adapter is tested on transformers 4.37 (the repository's pin) and 5.x, "
                f"not on {transformers.__version__}, whose per-layer cache_position and mask slicing it does not "
                "follow: pip install 'transformers==4.37.2' (scripts/setup_llava_repo.sh is the tested recipe)"
            )
        for name in ("get_model", "get_vision_tower", "prepare_inputs_labels_for_multimodal", "encode_images"):
            if not hasattr(model, name):
                raise UnsupportedModelError(
                    f"{type(model).__name__} has model type 'llava_llama' but no {name}(): pass the "
                    "LlavaLlamaForCausalLM that llava.model.builder.load_pretrained_model returns"
                )
        tower = model.get_vision_tower()
        if tower is None:
            raise UnsupportedModelError("this llava_llama model has no vision tower (mm_vision_tower is not set)")
        if not getattr(tower, "is_loaded", True):
            raise UnsupportedModelError(
                "the LLaVA vision tower is not loaded yet: load the model with "
                "llava.model.builder.load_pretrained_model, or call model.get_vision_tower().load_model() "
                "before vtprune.apply"
            )
        cfg = model.config
        merge = getattr(cfg, "mm_patch_merge_type", "flat")
        if merge != "flat":
            raise UnsupportedModelError(
                f"mm_patch_merge_type={merge!r} (LLaVA-1.6 anyres packing of the LLaVA repository) is not "
                "supported; vtprune supports the repository's LLaVA-1.5 checkpoints (flat), and LLaVA-1.6 "
                "through transformers (LlavaNextForConditionalGeneration)"
            )
        feature = getattr(tower, "select_feature", "patch")
        if feature not in ("patch", "cls_patch"):
            raise UnsupportedModelError(f"mm_vision_select_feature={feature!r} is not supported (patch, cls_patch)")

    # ---- structure ----------------------------------------------------------------------------
    def core(self) -> nn.Module:
        return self.model.get_model()  # LlavaLlamaModel: a LlamaModel fed inputs_embeds

    def encoder_owner(self) -> nn.Module:
        return self.model  # encode_images lives on LlavaMetaForCausalLM

    def decoder_layers(self) -> nn.ModuleList:
        return self.core().layers

    def image_token_id(self) -> int:
        return IMAGE_TOKEN_INDEX

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.core().embed_tokens(input_ids)

    def _tower(self) -> nn.Module:
        return self.model.get_vision_tower()

    def _clip(self) -> nn.Module:
        clip = self._tower().vision_tower  # transformers' CLIPVisionModel
        return getattr(clip, "vision_model", clip)

    def vision_encoder(self) -> nn.Module:
        """The CLIP vision transformer inside ``CLIPVisionTower`` (its forward takes the pixels, its
        ``encoder.layers`` are the vision layers): where FlowCut's vision stage hooks."""
        return self._clip()

    def vision_depth(self) -> int:
        return len(self._clip().encoder.layers)

    def vision_attention(self, layer: int) -> nn.Module:
        return clip_layer_attention(self._clip().encoder.layers, layer)

    def default_vision_layer(self) -> int:
        return int(self._tower().select_layer)

    def pad_grid(self) -> int | None:
        return self._grid()

    def _grid(self) -> int:
        return int(self._tower().num_patches_per_side)

    # ---- VisionZip's merge space: the tower's feature layer, before mm_projector -------------------
    def merge_features(self, images: Any) -> torch.Tensor:
        hidden = images.record.extras.get(FEATURE_HIDDEN) if images.record is not None else None
        if hidden is None:
            raise RuntimeError("the feature layer of the vision tower was not recorded for these images")
        return hidden

    def merge_projector(self) -> nn.Module:
        return self.core().mm_projector

    def _feature_hook(self, state: PruneState):
        layer = self.default_vision_layer()

        def hook(module, args, kwargs, output):
            extras = state.vision_extras
            if state.enabled and extras is not None and output.hidden_states is not None:
                hidden = output.hidden_states[layer]  # [crops, P + 1, C]
                prev = extras.get(FEATURE_HIDDEN)
                extras[FEATURE_HIDDEN] = hidden if prev is None else torch.cat([prev, hidden])
            return None

        return hook

    # ---- the encoder's output ---------------------------------------------------------------
    def encoder_features(self, modality: str, out: Any, bound: dict[str, Any]) -> list[torch.Tensor]:
        return list(out)  # [crops, P, D] projected features, one entry per crop

    def encoder_pixels(self, modality: str, bound: dict[str, Any]) -> Any:
        return bound.get("images")

    # ---- the prefill inputs ----------------------------------------------------------------------
    def extra_hooks(self, state: PruneState, features: bool = False) -> list:
        if features or state.scorer.needs_signal(VISION_FEATURES):
            return [self._tower().vision_tower.register_forward_hook(self._feature_hook(state), with_kwargs=True)]
        return []

    def token_kinds(self, input_ids: torch.Tensor | None, embeds: torch.Tensor | None) -> torch.Tensor:
        ref = input_ids if input_ids is not None else embeds
        pending, self._pending = self._pending, None
        self._current = None
        if (embeds is not None and pending is not None and pending.embeds.shape[:2] == embeds.shape[:2]
                and pending.embeds.data_ptr() == embeds.data_ptr()):
            self._current = pending
            return pending.visual.long().to(ref.device)
        # text only, or embeddings that did not come from prepare_inputs_labels_for_multimodal
        return torch.zeros(ref.shape[:2], dtype=torch.long, device=ref.device)

    def image_inputs(self, state: PruneState, kwargs: dict[str, Any]) -> ImageInputs:
        cur = self._current
        return ImageInputs(None, cur.tiles, None, None, cur.record)

    def ensure_encoded(self, state: PruneState, images: Any) -> None:
        if images.record is None:
            raise RuntimeError("the images of this prefill were not encoded by the patched encode_images")

    def merge_visual_features(self, images: Any, embeds: torch.Tensor, kinds: torch.Tensor,
                              host_kinds: torch.Tensor | None = None) -> torch.Tensor:
        return embeds  # the repository spliced them in already

    def strip_image_inputs(self, kwargs: dict[str, Any]) -> None:
        return None  # the LlamaModel takes no image inputs

    def tiles_per_image(self, geometry: Any, n_images: int) -> list[int]:
        return list(geometry) if geometry is not None else [1] * n_images

    def image_tokens(self, images: ImageInputs, n_visual: int) -> list[ImageTokens]:
        g = self._grid()
        full = getattr(self._tower(), "select_feature", "patch") == "cls_patch"
        stride = g * g + 1
        p = torch.arange(g * g)
        out, tile = [], 0
        for crops in images.image_sizes:
            src, coords = [], []
            for c in range(crops):
                t = tile + c
                if full:
                    src.append(torch.tensor([t * stride]))
                    coords.append(torch.tensor([[2, 0, 0]]))
                src.append(t * stride + 1 + p)
                coords.append(torch.stack([torch.full_like(p, c), p // g, p % g], dim=1))
            tile += crops
            src_t = torch.cat(src)
            out.append(ImageTokens(src_t, torch.cat(coords), torch.ones(src_t.numel(), dtype=torch.bool)))
        return out
