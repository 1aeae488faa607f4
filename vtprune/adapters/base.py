"""Adapter base class and registry: what a model family must tell vtprune, and the shared hook logic.

An adapter names the model's parts (the core module whose ``forward`` receives ``input_ids`` and
``pixel_values``, the decoder layers, the vision attention modules) and describes the visual tokens of
each image (`ImageTokens`). Everything else, per-call phase tracking, pre-LLM shortening and the
in-LLM layer hooks, is shared.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from vtprune.adapters.attention_rows import vit_cls_attention
from vtprune.adapters.llm_stage import LLMStageHooks
from vtprune.adapters.pre_llm_stage import shorten_decode_inputs, shorten_prefill_inputs
from vtprune.config import ConfigError
from vtprune.layout import VisualLayout
from vtprune.scorers.base import IN_LLM, PRE_LLM, VISION_CLS_ATTENTION
from vtprune.state import PruneState, Session, VisionRecord


class UnsupportedModelError(TypeError):
    """The model (or its cache) is not one vtprune can patch; the message lists what is supported."""


@dataclass
class ImageTokens:
    """The visual tokens one image contributes to the sequence, ``n`` of them in order.

    - ``source``: ``[n]`` long, ``tile * (patches + 1) + column`` into the vision encoder's CLS attention
      rows ``[tiles of the whole call, patches + 1]`` (column 0 is CLS itself; tiles are counted across
      all images of the call), -1 for tokens the encoder did not produce.
    - ``coords``: ``[n, 3]`` long ``(segment, row, col)``.
    - ``prunable``: ``[n]`` bool.
    """

    source: torch.Tensor
    coords: torch.Tensor
    prunable: torch.Tensor


@dataclass
class ImageInputs:
    """The images of one prefill call, from the call's arguments or from the encoder's record.

    transformers' ``generate()`` runs the image encoder first and passes only ``mm_encoder_outputs``,
    so ``pixel_values`` may be None while ``record`` holds the geometry of the encoded images.
    """

    pixel_values: torch.Tensor | None
    image_sizes: Any
    strategy: str | None
    layer: Any
    record: VisionRecord | None

    def features(self) -> list[torch.Tensor] | None:
        """Per image ``[n_i, D]`` projected features, if the encoder has run for this call."""
        if self.record is None:
            return None
        out = self.record.output
        return list(out.pooler_output if hasattr(out, "pooler_output") else out[1])


def image_inputs(state: PruneState, kwargs: dict[str, Any]) -> ImageInputs:
    """Collect the images of a prefill call; use the encoder's record when only features were passed."""
    pixels = kwargs.get("pixel_values")
    enc = (kwargs.get("mm_encoder_outputs") or {}).get("image")
    strategy = kwargs.get("vision_feature_select_strategy")
    if pixels is not None or enc is None:
        return ImageInputs(pixels, kwargs.get("image_sizes"), strategy, kwargs.get("vision_feature_layer"), None)
    rec = state.vision_record
    n_given = len(enc.pooler_output)
    if rec is None:
        raise ValueError(
            "the image features passed in mm_encoder_outputs were not computed by this patched model's "
            "get_image_features, so vtprune cannot locate the image tokens; pass pixel_values instead"
        )
    if n_given != rec.n_images:
        rec = _expanded_record(state, rec, enc)
    elif rec.output is not enc:
        rec = VisionRecord(enc, rec.image_sizes, rec.strategy, rec.n_images, rec.cls_attention, rec.features)
    return ImageInputs(None, rec.image_sizes, rec.strategy or strategy, kwargs.get("vision_feature_layer"), rec)


def _expanded_record(state: PruneState, rec: VisionRecord, enc: Any) -> VisionRecord:
    """Follow generate()'s expansion of the encoded images (num_beams / num_return_sequences > 1).

    generate() repeats each prompt's image group for each of its sequences, reusing the same feature
    tensors; map every expanded image back to its original by identity and gather the recorded
    geometry and CLS rows (per tile) the same way.
    """
    ids = {id(t): j for j, t in enumerate(rec.features)}  # generate() may have expanded rec.output in place
    try:
        idx = [ids[id(t)] for t in enc.pooler_output]
    except KeyError:
        raise ValueError(
            "the image features in mm_encoder_outputs do not come from this patched model's "
            "get_image_features, so vtprune cannot locate the image tokens; pass pixel_values instead"
        ) from None
    sizes = rec.image_sizes
    if sizes is not None:
        sizes = sizes[torch.tensor(idx)] if isinstance(sizes, torch.Tensor) else [sizes[j] for j in idx]
    cls = rec.cls_attention
    if cls is not None:
        tiles = state.adapter.tiles_per_image(rec.image_sizes, rec.n_images)
        starts = [sum(tiles[:j]) for j in range(len(tiles))]
        rows = torch.cat([torch.arange(starts[j], starts[j] + tiles[j]) for j in idx]).to(cls.device)
        cls = cls[rows]
    return VisionRecord(enc, sizes, rec.strategy, len(idx), cls, list(enc.pooler_output))


class _InstanceWrap:
    """Shadow a bound method on one instance with ``wrapper(original, *args, **kwargs)``; ``remove()`` undoes it."""

    def __init__(self, obj: Any, name: str, wrapper) -> None:
        self.obj, self.name = obj, name
        original = getattr(obj, name)
        self.had_instance_attr = name in vars(obj)
        self.previous = vars(obj).get(name)

        @functools.wraps(original)  # keeps the signature: generate() inspects it to route pixel inputs
        def wrapped(*args, **kwargs):
            return wrapper(original, *args, **kwargs)

        object.__setattr__(obj, name, wrapped)

    def remove(self) -> None:
        if self.had_instance_attr:
            object.__setattr__(self.obj, self.name, self.previous)
        else:
            vars(self.obj).pop(self.name, None)


class Adapter:
    """Base class of model adapters, registered by ``config.model_type``."""

    model_types: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # ---- what each family provides ------------------------------------------------------------
    def core(self) -> nn.Module:
        """The module whose forward receives ``input_ids``, ``pixel_values`` and the cache."""
        raise NotImplementedError

    def decoder_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def image_token_id(self) -> int:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.core().get_input_embeddings()(input_ids)

    def vision_attention(self, layer: int) -> nn.Module:
        """The attention module of vision-encoder layer ``layer`` (an index into ``hidden_states``)."""
        raise NotImplementedError

    def default_vision_layer(self) -> int:
        raise NotImplementedError

    def image_tokens(self, images: ImageInputs, n_visual: int) -> list[ImageTokens]:
        """Per image of the call, in order, the tokens it contributes (``n_visual`` in all)."""
        raise NotImplementedError

    def tiles_per_image(self, image_sizes: Any, n_images: int) -> list[int]:
        """How many vision-encoder inputs (crops) each image used; one by default."""
        return [1] * n_images

    def encode_images(self, images: ImageInputs) -> None:
        """Run the model's image encoder on ``images.pixel_values`` (recorded in ``state.vision_record``)."""
        raise NotImplementedError

    def strip_image_inputs(self, kwargs: dict[str, Any]) -> None:
        """Remove the pixel inputs from ``kwargs`` once their features are in ``inputs_embeds``."""
        for key in ("pixel_values", "image_sizes", "mm_encoder_outputs"):
            kwargs.pop(key, None)

    # ---- shared machinery ---------------------------------------------------------------------
    def install(self, state: PruneState) -> list:
        """Register every hook ``state`` needs; returns their handles (all or none are installed)."""
        core = self.core()
        cls_modules = []
        if state.scorer.needs_signal(VISION_CLS_ATTENTION):
            cls_modules = [self.vision_attention(layer) for layer in self.cls_layers(state)]  # validates first
        handles: list = []
        try:
            handles.append(core.register_forward_pre_hook(self._make_pre_hook(state), with_kwargs=True))
            # the cache the LLM fills may be created inside its forward: record it at the first layer
            handles.append(self.decoder_layers()[0].register_forward_pre_hook(
                self._make_cache_hook(state), with_kwargs=True))
            handles.append(_InstanceWrap(core, "get_image_features", self._make_vision_wrapper(state)))
            if state.stage == IN_LLM:
                handles += LLMStageHooks(state, self.decoder_layers()).install()
            for module in cls_modules:
                handles.append(module.register_forward_pre_hook(self._make_cls_hook(state), with_kwargs=True))
        except Exception:
            for handle in reversed(handles):
                handle.remove()
            raise
        return handles

    def cls_layers(self, state: PruneState) -> list[int]:
        chosen = getattr(state.scorer, "vision_layer", None)
        if chosen is None:
            chosen = self.default_vision_layer()
        return [chosen] if isinstance(chosen, int) else list(chosen)

    @staticmethod
    def _make_cls_hook(state: PruneState):
        def hook(module, args, kwargs):
            if state.enabled:
                hidden = args[0] if args else kwargs["hidden_states"]
                row = vit_cls_attention(module, hidden)
                acc = state.cls_accumulator
                state.cls_accumulator = row if acc is None else acc + row
            return None

        return hook

    def _make_vision_wrapper(self, state: PruneState):
        def wrapper(original, *args, **kwargs):
            state.cls_accumulator = None
            out = original(*args, **kwargs)
            bound = inspect.signature(original).bind_partial(*args, **kwargs).arguments
            pooled = out.pooler_output if hasattr(out, "pooler_output") else out[1]
            state.vision_record = VisionRecord(
                output=out,
                image_sizes=bound.get("image_sizes"),
                strategy=bound.get("vision_feature_select_strategy"),
                n_images=len(pooled),
                cls_attention=state.cls_accumulator,
                features=list(pooled),
            )
            state.cls_accumulator = None
            return out

        return wrapper

    @staticmethod
    def _make_cache_hook(state: PruneState):
        def hook(module, args, kwargs):
            sess = state.session
            if sess.phase == "prefill" and kwargs.get("past_key_values") is not None:
                check_cache(kwargs["past_key_values"])
                sess.cache = kwargs["past_key_values"]
            return None

        return hook

    def _make_pre_hook(self, state: PruneState):
        signature = inspect.signature(self.core().forward)

        def hook(module, args, kwargs):
            if not state.enabled:
                state.session = Session()
                return None
            if args:
                kwargs = dict(signature.bind_partial(*args, **kwargs).arguments)
                kwargs.update(kwargs.pop("kwargs", {}) or {})
            return self._on_forward(state, kwargs)

        return hook

    def _on_forward(self, state: PruneState, kwargs: dict[str, Any]):
        cache = kwargs.get("past_key_values")
        check_cache(cache)
        sess = state.session
        past = cache.get_seq_length() if cache is not None else 0
        if past > 0:
            if sess.cache is not cache or sess.phase == "off":
                state.session = Session()  # a cache vtprune did not prune: pass through
                return None
            if state.stage == PRE_LLM or sess.keep_seq is not None:
                sess.phase = "decode"
            if state.stage == PRE_LLM and sess.pre_index is not None:
                shorten_decode_inputs(sess, kwargs)
                return (), kwargs
            return None
        # a new prefill
        sess = state.session = Session()
        input_ids = kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref is None:
            return None
        visual = self.visual_mask(input_ids, embeds)
        if not bool(visual.any()):
            state.stats = None
            return None
        n = ref.shape[1]
        mask2d = kwargs.get("attention_mask")
        if mask2d is not None and mask2d.dim() != 2:
            raise ValueError(
                "vtprune needs a 2D attention_mask [batch, seq] (or None) at prefill, got shape "
                f"{tuple(mask2d.shape)}; pass the tokenizer's attention_mask"
            )
        sess.attention_2d = (mask2d.bool() if mask2d is not None
                             else torch.ones(ref.shape[:2], dtype=torch.bool, device=ref.device))
        sess.query_pos = last_true(sess.attention_2d)
        sess.seq_len = n
        sess.cache = cache
        sess.phase = "prefill"
        images = image_inputs(state, kwargs)
        sess.layout = build_layout(visual, self.image_tokens(images, int(visual.sum())))
        if state.stage == PRE_LLM:
            shorten_prefill_inputs(self, state, kwargs, images, visual)
            return (), kwargs
        return None

    def visual_mask(self, input_ids: torch.Tensor | None, embeds: torch.Tensor | None) -> torch.Tensor:
        """``[B, N]`` bool, True on image placeholder tokens."""
        if input_ids is not None:
            return input_ids == self.image_token_id()
        token = torch.tensor(self.image_token_id(), device=embeds.device)
        return (embeds == self.embed(token).to(embeds.dtype)).all(-1)


def last_true(mask: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` bool -> ``[B]`` index of the last True per row (the last prompt token)."""
    n = mask.shape[1]
    idx = torch.arange(n, device=mask.device).expand_as(mask)
    return torch.where(mask, idx, torch.full_like(idx, -1)).max(dim=1).values.clamp(min=0)


def build_layout(visual: torch.Tensor, images: list[ImageTokens]) -> VisualLayout:
    """Assign the images, in order, to the visual tokens of each row of ``visual`` ``[B, N]``."""
    positions, image, prunable, source, coords = [], [], [], [], []
    it = 0
    for b in range(visual.shape[0]):
        pos = torch.nonzero(visual[b]).flatten()
        need, parts = int(pos.numel()), []
        while need > 0:
            if it >= len(images):
                raise ValueError(
                    f"sample {b} has {int(pos.numel())} image tokens but the images provided do not cover "
                    "them; check that every <image> placeholder has an image"
                )
            parts.append(images[it])
            need -= int(images[it].source.numel())
            it += 1
        if need < 0:
            raise ValueError(
                f"image tokens of sample {b} do not line up with whole images ({int(pos.numel())} tokens); "
                "let the processor expand the <image> placeholders"
            )
        dev = pos.device
        positions.append(pos)
        image.append(torch.cat([torch.full((int(p.source.numel()),), i, device=dev)
                                for i, p in enumerate(parts)]) if parts else pos.new_zeros(0))
        prunable.append(torch.cat([p.prunable for p in parts]).to(dev) if parts
                        else torch.zeros(0, dtype=torch.bool, device=dev))
        source.append(torch.cat([p.source for p in parts]).to(dev) if parts else pos.new_zeros(0))
        coords.append(torch.cat([p.coords for p in parts]).to(dev) if parts else pos.new_zeros(0, 3))
    if it != len(images):
        raise ValueError(f"{len(images)} images were given but the prompts hold placeholders for {it}")
    return VisualLayout(positions, image, prunable, source, coords, seq_len=visual.shape[1])


def check_cache(cache: Any) -> None:
    """Only a plain DynamicCache (full-attention layers) can hold layers of different lengths."""
    if cache is None:
        return
    from transformers.cache_utils import DynamicCache, DynamicLayer

    ok = isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)
    if not ok:
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
        raise UnsupportedModelError(
            f"vtprune supports only DynamicCache with full-attention layers, got {type(cache).__name__} "
            f"(layers: {kinds or 'n/a'}). Pruned layers cache fewer entries than unpruned ones, which "
            "static, quantized, offloaded and sliding-window caches cannot hold. Use the default cache "
            "(do not pass cache_implementation=...) or pass past_key_values=DynamicCache()."
        )


_ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    for t in cls.model_types:
        _ADAPTERS[t] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter registered for ``model.config.model_type``; a clear error for anything else."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise UnsupportedModelError(
            f"vtprune has no adapter for model type {model_type!r} ({type(model).__name__}); "
            f"supported model types: {', '.join(supported_model_types())}"
        )
    return _ADAPTERS[model_type](model)


def check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer <= n_layers - 2:
        raise ConfigError(
            f"layer={layer} is out of range for a language model with {n_layers} decoder layers: "
            f"in-LLM pruning needs 0 <= layer <= {n_layers - 2} (some layer must run after the pruning point)"
        )
