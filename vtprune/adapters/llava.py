"""Adapters for transformers' LLaVA-1.5 (`LlavaForConditionalGeneration`) and LLaVA-NeXT.

LLaVA-NeXT budget: ``keep`` applies per image across all of its tiles (the base image and the
high-resolution grid together), and the image-newline tokens that end each row of the grid are never
pruned and not counted in the budget.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vtprune.adapters.base import Adapter, ImageInputs, ImageTokens, UnsupportedModelError, register_adapter


def clip_layer_attention(layers: nn.ModuleList, layer: int) -> nn.Module:
    """The attention module of CLIP encoder ``layers`` whose output is ``hidden_states[layer]``."""
    n = len(layers)
    h = layer + n + 1 if layer < 0 else layer
    if not 1 <= h <= n:
        raise ValueError(
            f"vision_layer={layer} is out of range for a vision tower with {n} layers: use a "
            f"hidden_states index in [1, {n}] or [-{n}, -1] (-2 is LLaVA's feature layer)"
        )
    return layers[h - 1].self_attn


class _LlavaFamily(Adapter):
    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        core = self.require_core("vision_tower", "LlavaForConditionalGeneration")
        tower = core.vision_tower
        if not hasattr(getattr(tower, "encoder", None), "layers"):
            raise UnsupportedModelError(
                f"the vision tower {type(tower).__name__} has no encoder.layers; vtprune supports CLIP-style towers"
            )

    # structure
    def _vision_layers(self) -> nn.ModuleList:
        return self.core().vision_tower.encoder.layers

    def vision_attention(self, layer: int) -> nn.Module:
        return clip_layer_attention(self._vision_layers(), layer)

    def default_vision_layer(self) -> int:
        layer = self.model.config.vision_feature_layer
        return layer if isinstance(layer, int) else list(layer)[-1]

    # geometry
    def _strategy(self, images: ImageInputs) -> str:
        return images.strategy or self.model.config.vision_feature_select_strategy

    def _grid(self) -> int:
        vc = self.model.config.vision_config
        return vc.image_size // vc.patch_size

    def _tile_tokens(self, tile: int, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Source indices and coords of one tile's tokens (CLS first when ``full``)."""
        g = self._grid()
        p = torch.arange(g * g)
        stride = g * g + 1
        src = tile * stride + 1 + p
        coords = torch.stack([torch.zeros_like(p), p // g, p % g], dim=1)
        if full:
            src = torch.cat([torch.tensor([tile * stride]), src])
            coords = torch.cat([torch.tensor([[2, 0, 0]]), coords])
        return src, coords

    def tile_first(self, images: ImageInputs) -> int:
        return 0 if self._strategy(images) == "full" else 1

    def merge_features(self, images: ImageInputs) -> torch.Tensor:
        rec = images.record
        hidden = rec.output.hidden_states
        layer = images.layer if images.layer is not None else self.model.config.vision_feature_layer
        layers = [layer] if isinstance(layer, int) else list(layer)
        if hidden is None or any(hidden[i] is None for i in layers):
            raise RuntimeError("the image encoder output holds no hidden states of the feature layer")
        return torch.cat([hidden[i] for i in layers], dim=-1)

    def merge_projector(self) -> nn.Module:
        return self.core().multi_modal_projector

    def _feature_kwargs(self, images: ImageInputs) -> dict[str, Any]:
        return {"vision_feature_layer": images.layer, "vision_feature_select_strategy": images.strategy}

@register_adapter
class LlavaAdapter(_LlavaFamily):
    """LLaVA-1.5 (`LlavaForConditionalGeneration`): 576 tokens per 336 px image, one tile each."""

    model_types = ("llava",)
    description = "LLaVA-1.5 (LlavaForConditionalGeneration)"

    def pad_grid(self) -> int | None:
        return self._grid()

    def encode_images(self, images: ImageInputs) -> None:
        self.core().get_image_features(
            pixel_values=images.pixel_values, image_sizes=images.image_sizes, return_dict=True,
            **self._feature_kwargs(images),
        )

    def image_tokens(self, images: ImageInputs, n_visual: int) -> list[ImageTokens]:
        full = self._strategy(images) == "full"
        per_image = self._grid() ** 2 + int(full)
        if images.pixel_values is not None:
            n_images = images.pixel_values.shape[0]
        elif images.record is not None:
            n_images = images.record.n_images
        else:
            n_images = n_visual // per_image
        images = []
        for i in range(n_images):
            src, coords = self._tile_tokens(i, full)
            images.append(ImageTokens(src, coords, torch.ones(src.numel(), dtype=torch.bool)))
        return images


@register_adapter
class LlavaNextAdapter(_LlavaFamily):
    """LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres tiles + image-newline tokens."""

    model_types = ("llava_next",)
    description = "LLaVA-NeXT / LLaVA-1.6 (LlavaNextForConditionalGeneration)"
    tiled = True
    geometry_keys = ("image_sizes",)

    def tile_grid(self, image_size: Any) -> tuple[int, int]:
        """``(rows, cols)`` of the crop grid of an image of ``image_size`` (height, width)."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        cfg = self.model.config
        size = image_size.tolist() if isinstance(image_size, torch.Tensor) else list(image_size)
        rows, cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        return int(rows), int(cols)

    def tiles_per_image(self, image_sizes: Any, n_images: int) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        return [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                for s in image_sizes]

    def encode_images(self, images: ImageInputs) -> None:
        self.core().get_image_features(
            images.pixel_values, images.image_sizes, return_dict=True, **self._feature_kwargs(images)
        )

    def image_tokens(self, images: ImageInputs, n_visual: int) -> list[ImageTokens]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        sizes = images.image_sizes
        if sizes is None:
            raise ValueError(
                "vtprune needs image_sizes to locate LLaVA-NeXT's image tokens (tiles and newline "
                "tokens); pass the processor's outputs (pixel_values and image_sizes) to the model"
            )
        if isinstance(sizes, torch.Tensor):
            sizes = self.host_of(sizes)  # read with the prefill's token kinds (`geometry_keys`)
        cfg = self.model.config
        full = self._strategy(images) == "full"
        g = self._grid()
        base_len = g * g + int(full)
        # Run the model's own packing on tile/patch indices: whatever it does to features (unpadding,
        # newline insertion) it does to the indices, so the layout always matches the real features.
        index_feats, tile = [], 0
        for size in sizes:
            tiles = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            srcs = torch.stack([self._tile_tokens(tile + t, full)[0] for t in range(tiles)])
            index_feats.append(srcs.to(torch.float64)[..., None])
            tile += tiles
        packed, _ = self.core().pack_image_features(
            index_feats, sizes, self._strategy(images), image_newline=torch.tensor([-1.0], dtype=torch.float64)
        )
        base_coords = self._tile_tokens(0, full)[1]
        images = []
        for feats in packed:
            src = feats[:, 0].round().long()
            hi = src[base_len:]
            rows = max(1, int((hi < 0).sum()))
            width = max(1, hi.numel() // rows)
            r = torch.arange(hi.numel())
            hi_coords = torch.stack([torch.ones_like(r), r // width, r % width], dim=1)
            coords = torch.cat([base_coords, hi_coords])
            images.append(ImageTokens(src, coords, src >= 0))
        return images
