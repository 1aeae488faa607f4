"""Adapter base class and registry: what a model family must tell vtprune, and the shared hook logic.

An adapter names the model's parts (the core module whose ``forward`` receives ``input_ids`` and
``pixel_values``, the decoder layers, the vision attention modules) and describes the visual tokens of
each image (`ImageTokens`). Everything else, per-call phase tracking, pre-LLM shortening and the
in-LLM layer hooks, is shared.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from vtprune.adapters.attention_rows import vit_cls_attention
from vtprune.adapters.flowcut_stage import flowcut_hooks
from vtprune.adapters.llm_stage import LLMStageHooks
from vtprune.adapters.pre_llm_stage import shorten_decode_inputs, shorten_prefill_inputs
from vtprune.adapters.visionzip_stage import recycling_hooks
from vtprune.config import ConfigError
from vtprune.kernels import compact
from vtprune.layout import VisualLayout, last_true
from vtprune.scorers.base import IN_LLM, PRE_LLM, VISION_CLS_ATTENTION
from vtprune.state import PruneState, Session, VisionRecord, cache_length, cache_of


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
    rec = match_record(state, state.vision_record, enc, "image")
    return ImageInputs(None, rec.geometry, rec.strategy or strategy, kwargs.get("vision_feature_layer"), rec)


def match_record(state: PruneState, rec: VisionRecord | None, enc: Any, modality: str) -> VisionRecord:
    """The record of the encoder run that produced ``enc`` (features passed in ``mm_encoder_outputs``)."""
    if rec is None:
        raise ValueError(
            f"the {modality} features passed in mm_encoder_outputs were not computed by this patched model's "
            f"get_{modality}_features, so vtprune cannot locate the {modality} tokens; pass the pixel inputs instead"
        )
    if len(enc.pooler_output) != rec.n_images:
        return _expanded_record(state, rec, enc)
    if rec.output is not enc:
        return VisionRecord(enc, rec.geometry, rec.strategy, rec.n_images, rec.cls_attention, rec.features,
                            extras=rec.extras)
    return rec


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
    sizes = rec.geometry
    if sizes is not None:
        sizes = sizes[torch.tensor(idx)] if isinstance(sizes, torch.Tensor) else [sizes[j] for j in idx]
    cls = rec.cls_attention
    if cls is not None:
        tiles = state.adapter.tiles_per_image(rec.geometry, rec.n_images)
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
    """Base class of model adapters, registered by ``config.model_type``.

    The defaults implement the LLaVA family (one image token id, a CLIP tower with a CLS token, 1-D
    positions); the Qwen-VL adapters override the geometry, scoring and position methods.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    # name of the modality -> the core's encoder method whose runs are recorded
    encoders: ClassVar[dict[str, str]] = {"image": "get_image_features"}
    # "clip": a CLS token and one LLM token per patch; "qwen": no CLS, one LLM token per 2x2 patch group
    vision_family: ClassVar[str] = "clip"
    # the oldest transformers release the adapter works with (the transformers-v5 model classes need 5.0)
    min_transformers: ClassVar[str] = "5.0"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._host_copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.encoding_geometry: Any = None  # host geometry of the encoder call running now (see wrapper)

    def host_of(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of a small geometry tensor (``image_grid_thw``, ``image_sizes``), read from the device
        once per tensor object: the layout, the encoder hooks and the score mapping of one prefill share it."""
        for src, host in self._host_copies:
            if src is t:
                return host
        host = t.cpu()
        self._host_copies = [(t, host), *self._host_copies[:3]]
        return host

    def host_geometry(self, modality: str, bound: dict[str, Any]) -> Any:
        """The host copy of an encoder call's geometry argument (None where the family has none)."""
        return None

    def require_core(self, tower: str, loader: str) -> nn.Module:
        """``model.model`` with ``.language_model`` and the vision tower ``tower``, or a clear error."""
        core = getattr(self.model, "model", None)
        if core is None or not hasattr(core, "language_model") or not hasattr(core, tower):
            raise UnsupportedModelError(
                f"{type(self.model).__name__} is not a {self.model_types[0]} *ForConditionalGeneration model "
                f"(expected .model.language_model and .model.{tower}); pass the full model as loaded by "
                f"AutoModelForImageTextToText / {loader}"
            )
        return core

    # ---- what each family provides ------------------------------------------------------------
    # the defaults fit transformers v5's *ForConditionalGeneration layout (model.model.language_model)
    def core(self) -> nn.Module:
        """The module whose forward receives ``input_ids``, ``pixel_values`` and the cache."""
        return self.model.model

    def encoder_owner(self) -> nn.Module:
        """The module whose `encoders` methods run the vision encoder (the core in transformers v5)."""
        return self.core()

    def encoder_features(self, modality: str, out: Any, bound: dict[str, Any]) -> list[torch.Tensor]:
        """Per image ``[n_i, D]`` projected features of one encoder call's output ``out``."""
        return list(out.pooler_output if hasattr(out, "pooler_output") else out[1])

    def encoder_pixels(self, modality: str, bound: dict[str, Any]) -> Any:
        """The pixel input of one encoder call (its bound arguments ``bound``), as given."""
        return bound.get("pixel_values_videos" if modality == "video" else "pixel_values")

    def decoder_layers(self) -> nn.ModuleList:
        return self.core().language_model.layers

    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def visual_token_ids(self) -> list[int]:
        """Placeholder token ids that the vision features replace (images, and videos where supported)."""
        return [self.image_token_id()]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.core().get_input_embeddings()(input_ids)

    def vision_attention(self, layer: int) -> nn.Module:
        """The attention module of vision-encoder layer ``layer`` (an index into ``hidden_states``)."""
        raise NotImplementedError

    def default_vision_layer(self) -> int:
        raise NotImplementedError

    def vision_depth(self) -> int:
        """Number of layers of the vision tower."""
        vc = self.model.config.vision_config
        return int(getattr(vc, "num_hidden_layers", None) or vc.depth)

    def pad_grid(self) -> int | None:
        """Patch grid side of a square single-crop image (LLaVA-1.5: 24) where padding detection applies."""
        return None

    def check_scorer(self, scorer: Any) -> None:
        """Raise `ConfigError` for a method this model family cannot run (before the scorer binds)."""

    def min_layer(self) -> int:
        """The smallest decoder layer after which in-LLM pruning may drop tokens."""
        return 0

    def check_layer(self, layer: int) -> None:
        check_layer(layer, len(self.decoder_layers()))
        if layer < self.min_layer():
            raise ConfigError(self.min_layer_reason(layer))

    def min_layer_reason(self, layer: int) -> str:
        return f"layer={layer} is below {self.min_layer()}"

    def image_inputs(self, state: PruneState, kwargs: dict[str, Any]) -> Any:
        """The images of a prefill call (`ImageInputs` for the LLaVA family)."""
        return image_inputs(state, kwargs)

    def image_tokens(self, images: ImageInputs, n_visual: int) -> list[ImageTokens]:
        """Per image of the call, in order, the tokens it contributes (``n_visual`` in all)."""
        raise NotImplementedError

    def build_layout(self, images: Any, kinds: torch.Tensor, device: torch.device) -> VisualLayout:
        """The `VisualLayout` of a prefill whose token kinds (see `token_kinds`) are ``kinds`` ``[B, N]`` (a
        host copy), its tensors on ``device``."""
        visual = kinds > 0
        return build_layout(visual, self.image_tokens(images, int(visual.sum())), device)

    def tiles_per_image(self, geometry: Any, n_images: int) -> list[int]:
        """How many rows of the recorded vision scores each image owns (its crops); one by default."""
        return [1] * n_images

    def record_geometry(self, modality: str, bound: dict[str, Any]) -> Any:
        """What to remember of an encoder call's arguments to lay out its tokens later."""
        return bound.get("image_sizes")

    def encode_images(self, images: ImageInputs) -> None:
        """Run the model's image encoder on ``images.pixel_values`` (recorded in ``state.vision_record``)."""
        raise NotImplementedError

    def ensure_encoded(self, state: PruneState, images: Any) -> None:
        """Encode the call's images unless ``generate()`` already did (pre-LLM pruning needs the features)."""
        if images.record is None:
            self.encode_images(images)
            images.record = state.vision_record

    def merge_visual_features(self, images: Any, embeds: torch.Tensor, kinds: torch.Tensor,
                              host_kinds: torch.Tensor | None = None) -> torch.Tensor:
        """``embeds`` ``[B, N, D]`` with the projected visual features written at the visual positions
        (``host_kinds``: a host copy of ``kinds``, to count the tokens without reading the device)."""
        visual = kinds > 0
        feat = torch.cat(images.features(), dim=0).to(embeds.device, embeds.dtype)
        n_visual = int((kinds if host_kinds is None else host_kinds).gt(0).sum())
        if feat.shape[0] != n_visual:
            raise ValueError(
                f"the prompts hold {n_visual} image tokens but the images produce {feat.shape[0]} features; "
                "let the model's processor build input_ids and pixel_values together"
            )
        return embeds.masked_scatter(visual[..., None].expand_as(embeds), feat)

    def vision_scores(self, images: Any) -> torch.Tensor:
        """The recorded encoder-side scores of the call, indexed by `ImageTokens.source` once flattened."""
        rows = images.record.cls_attention if images.record is not None else None
        if rows is None:
            raise RuntimeError("no CLS attention was recorded while the images were encoded")
        return rows

    def merge_features(self, images: Any) -> torch.Tensor:
        """``[tiles, patches + 1, C]`` the vision features entering the projector, CLS row kept (VisionZip
        merges contextual tokens in this space; CLIP-family adapters)."""
        raise NotImplementedError

    def merge_projector(self) -> nn.Module:
        """The projector from `merge_features` space to LLM embeddings (CLIP-family adapters)."""
        raise NotImplementedError

    def shortened_positions(self, sess: Session, original: dict[str, Any], kwargs: dict[str, Any],
                            dropped: torch.Tensor) -> None:
        """Set the position ids of the shortened prefill in ``kwargs`` (LLaVA: contiguous 1-D positions)."""
        pos = original.get("position_ids")
        if pos is not None:
            if pos.dim() != 2:
                raise ValueError(f"pre-LLM pruning expects 2D position_ids [batch, seq], got {tuple(pos.shape)}")
            removed_before = compact(dropped.long().cumsum(1), sess.pre_index)
            kwargs["position_ids"] = (compact(pos, sess.pre_index) - removed_before).masked_fill(~sess.pre_valid, 0)

    def decode_positions(self, sess: Session, kwargs: dict[str, Any]) -> None:
        """Map a decode step's position ids after pre-LLM pruning (LLaVA: shift by the tokens removed)."""
        pos = kwargs.get("position_ids")
        if pos is not None:
            kwargs["position_ids"] = pos - sess.pre_removed[:, None].to(pos.device)

    def after_shortening(self, state: PruneState, images: Any, visual: torch.Tensor, dropped: torch.Tensor) -> None:
        """Anything else the LLM needs about the kept visual tokens (Qwen3-VL: its deepstack features)."""

    def strip_image_inputs(self, kwargs: dict[str, Any]) -> None:
        """Remove the pixel inputs from ``kwargs`` once their features are in ``inputs_embeds``."""
        for key in ("pixel_values", "image_sizes", "mm_encoder_outputs"):
            kwargs.pop(key, None)

    def extra_hooks(self, state: PruneState) -> list:
        """Family-specific hooks (handles with ``remove()``)."""
        return []

    # ---- vision-side scores ---------------------------------------------------------------------
    def vision_score_row(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """The score rows one hooked vision attention module contributes (summed over hooked layers)."""
        hidden = args[0] if args else kwargs["hidden_states"]
        return vit_cls_attention(module, hidden)

    def finish_vision_scores(self, modality: str, summed: torch.Tensor, bound: dict[str, Any]) -> torch.Tensor:
        """Turn the summed rows of one encoder call into the recorded ``cls_attention``."""
        return summed

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
            handles.append(core.register_forward_hook(self._make_post_hook(state), with_kwargs=True))
            for modality, name in self.encoders.items():
                handles.append(_InstanceWrap(self.encoder_owner(), name, self._make_vision_wrapper(state, modality)))
            if state.stage == IN_LLM or state.schedule:  # in-LLM, or LLM stages after a pre-LLM one
                handles += LLMStageHooks(state, self.decoder_layers()).install()
            for module in cls_modules:
                handles.append(module.register_forward_pre_hook(self._make_cls_hook(state), with_kwargs=True))
            handles += self.extra_hooks(state)
            handles += state.scorer.model_hooks(self, state)
            handles += recycling_hooks(self, state)  # VisionZip's key recording (no hook otherwise)
            handles += flowcut_hooks(self, state)  # FlowCut's vision and LLM stages (no hook otherwise)
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

    def _make_cls_hook(self, state: PruneState):
        def hook(module, args, kwargs):
            if state.enabled:
                with state.timer.part("score"):
                    row = self.vision_score_row(module, args, kwargs)
                    acc = state.cls_accumulator
                    state.cls_accumulator = row if acc is None else acc + row
            return None

        return hook

    def _make_vision_wrapper(self, state: PruneState, modality: str):
        def wrapper(original, *args, **kwargs):
            if state.encoding:  # nested call (Qwen3-VL's video encoder runs the image encoder)
                return original(*args, **kwargs)
            state.cls_accumulator = None
            state.vision_extras = {}
            state.encoding = True
            bound = inspect.signature(original).bind_partial(*args, **kwargs).arguments
            bound.update(bound.pop("kwargs", {}) or {})
            self.encoding_geometry = self.host_geometry(modality, bound)
            try:
                out = original(*args, **kwargs)
            finally:
                state.encoding = False
                self.encoding_geometry = None
            pooled = self.encoder_features(modality, out, bound)
            scores = state.cls_accumulator
            if scores is not None:
                scores = self.finish_vision_scores(modality, scores, bound)
            record = VisionRecord(
                output=out,
                geometry=self.record_geometry(modality, bound),
                strategy=bound.get("vision_feature_select_strategy"),
                n_images=len(pooled),
                cls_attention=scores,
                features=list(pooled),
                pixel_values=self.encoder_pixels(modality, bound),
                extras=state.vision_extras or {},
            )
            setattr(state, "video_record" if modality == "video" else "vision_record", record)
            state.cls_accumulator = None
            state.vision_extras = None
            return out

        return wrapper

    @staticmethod
    def _make_cache_hook(state: PruneState):
        def hook(module, args, kwargs):
            sess = state.session
            cache = cache_of(kwargs)
            sess.step_cache = cache
            if sess.phase == "prefill" and cache is not None:
                check_cache(cache, uniform=state.uniform_cache)
                sess.cache = cache
            return None

        return hook

    @staticmethod
    def _make_post_hook(state: PruneState):
        """Remember the cache the core returned: transformers 4.x returns a new legacy tuple every call."""
        def hook(module, args, kwargs, output):
            sess = state.session
            returned = cache_of(output) if isinstance(output, dict) else None
            if sess.phase in ("prefill", "decode") and isinstance(returned, (tuple, list)):
                sess.cache = returned
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
        cache = cache_of(kwargs)
        sess = state.session
        if self._continues(sess, cache, kwargs):
            if sess.cache is not cache or sess.phase == "off":
                check_cache(cache, uniform=state.uniform_cache)
                state.session = Session()  # a cache vtprune did not prune: pass through
                return None
            if state.stage == PRE_LLM or sess.keep_seq is not None:
                sess.phase = "decode"
            sess.step_masks = {}
            step = _query_length(kwargs)
            if state.stage == PRE_LLM and sess.pre_index is not None:
                shorten_decode_inputs(sess, kwargs)
                self.decode_positions(sess, kwargs)
                sess.decoded += step
                return (), kwargs
            sess.decoded += step
            return None
        # a new prefill
        check_cache(cache, uniform=state.uniform_cache)
        sess = state.session = Session()
        input_ids = kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref is None:
            return None
        mask2d = kwargs.get("attention_mask")
        kinds = self.token_kinds(input_ids, embeds)
        if isinstance(mask2d, dict) or (mask2d is not None and mask2d.dim() == 4):
            if is_static_cache(cache) and state.uniform_cache:  # generate() built the masks of a static cache
                mask2d = kwargs["attention_mask"] = validity_from_4d(full_attention_mask(mask2d), ref.shape[1])
            elif isinstance(mask2d, dict):
                mask2d = full_attention_mask(mask2d)
        if mask2d is not None and mask2d.dim() != 2:
            if not bool(kinds.any()):
                state.stats = None
                return None
            raise ValueError(
                "vtprune needs a 2D attention_mask [batch, seq] (or None) at prefill, got shape "
                f"{tuple(mask2d.shape)}; pass the tokenizer's attention_mask"
            )
        valid = (mask2d.bool() if mask2d is not None
                 else torch.ones(ref.shape[:2], dtype=torch.bool, device=ref.device))
        # the prefill's one read of device memory: token kinds and validity, from which every count is known
        host = torch.stack([kinds, valid.to(kinds.dtype)]).cpu()
        host_kinds, host_valid = host[0], host[1].bool()
        if not bool(host_kinds.any()):
            state.stats = None
            return None
        images = self.image_inputs(state, kwargs)
        self.begin_prefill(sess, valid, kinds, images, host_kinds, host_valid)
        sess.cache = cache
        if state.stage == PRE_LLM:
            shorten_prefill_inputs(self, state, kwargs, images, kinds > 0)
            return (), kwargs
        return None

    @staticmethod
    def _continues(sess: Session, cache: Any, kwargs: dict[str, Any]) -> bool:
        """Whether this forward continues a cached sequence (a decode step) rather than starting one.

        Dynamic and legacy caches tell by their (host-known) shapes. A static cache keeps its length on the
        device, so for the cache this session filled the answer comes from host facts instead: no new
        image inputs, and a 2D mask as long as the prompt plus the tokens decoded since.
        """
        if cache is None:
            return False
        if not is_static_cache(cache):
            return cache_length(cache) > 0
        if cache is sess.cache and sess.phase in ("prefill", "decode"):
            if any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")):
                return False
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                return int(mask.shape[1]) == sess.seq_len + sess.decoded + _query_length(kwargs)
            return True
        return bool(cache_length(cache) > 0)  # a cache this session did not fill: read its length once

    def begin_prefill(self, sess: Session, valid: torch.Tensor, kinds: torch.Tensor, images: Any,
                      host_kinds: torch.Tensor | None = None, host_valid: torch.Tensor | None = None) -> None:
        """Fill a new prefill's session: ``valid`` ``[B, N]`` real tokens, ``kinds`` ``[B, N]`` (`token_kinds`),
        and their host copies (read here when not given)."""
        if host_kinds is None or host_valid is None:
            host = torch.stack([kinds, valid.to(kinds.dtype)]).cpu()
            host_kinds, host_valid = host[0], host[1].bool()
        sess.attention_2d = valid
        sess.host_valid = host_valid
        sess.query_pos = last_true(valid)
        sess.seq_len = sess.llm_len = int(valid.shape[1])
        sess.phase = "prefill"
        sess.kinds = kinds
        sess.host_kinds = host_kinds
        sess.layout = self.build_layout(images, host_kinds, kinds.device)

    def token_kinds(self, input_ids: torch.Tensor | None, embeds: torch.Tensor | None) -> torch.Tensor:
        """``[B, N]`` long: 0 for text, ``i + 1`` for the ``i``-th id of `visual_token_ids`."""
        ids = self.visual_token_ids()
        ref = input_ids if input_ids is not None else embeds
        kinds = torch.zeros(ref.shape[:2], dtype=torch.long, device=ref.device)
        for i, token in enumerate(ids):
            if input_ids is not None:
                hit = input_ids == token
            else:
                vec = self.embed(torch.tensor(token, device=embeds.device)).to(embeds.dtype)
                hit = (embeds == vec).all(-1)
            kinds = kinds.masked_fill(hit, i + 1)
        return kinds


def build_layout(visual: torch.Tensor, images: list[ImageTokens], device: torch.device | str) -> VisualLayout:
    """Assign the images, in order, to the visual tokens of each row of ``visual`` ``[B, N]`` (a host tensor).

    Everything is assembled on the host and reaches ``device`` in one copy; the layout keeps the host
    copies of the image ids and prunable flags, so the per-image structure needs no device read.
    """
    visual = visual.cpu()
    host_pos, host_img, host_prunable, host_src, host_coords = [], [], [], [], []
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
        host_pos.append(pos)
        host_img.append(torch.cat([torch.full((int(p.source.numel()),), i) for i, p in enumerate(parts)])
                        if parts else pos.new_zeros(0))
        host_prunable.append(torch.cat([p.prunable.cpu() for p in parts]) if parts
                             else torch.zeros(0, dtype=torch.bool))
        host_src.append(torch.cat([p.source.cpu() for p in parts]) if parts else pos.new_zeros(0))
        host_coords.append(torch.cat([p.coords.cpu() for p in parts]) if parts else pos.new_zeros(0, 3))
    if it != len(images):
        raise ValueError(f"{len(images)} images were given but the prompts hold placeholders for {it}")
    # one host-to-device copy: rows positions, image, prunable, source, coords (3)
    packed = torch.cat([torch.stack([p, i, r.long(), s, *c.long().T]) if p.numel() else torch.zeros(7, 0, dtype=torch.long)
                        for p, i, r, s, c in zip(host_pos, host_img, host_prunable, host_src, host_coords)], dim=1)
    dev = torch.device(device)
    if dev.type == "cuda":
        packed = packed.pin_memory()  # an asynchronous copy: the host does not wait for the device
    packed = packed.to(dev, non_blocking=True)
    flags = packed[2].bool()
    positions, image, prunable, source, coords = [], [], [], [], []
    off = 0
    for p in host_pos:
        n = int(p.numel())
        positions.append(packed[0, off:off + n])
        image.append(packed[1, off:off + n])
        prunable.append(flags[off:off + n])
        source.append(packed[3, off:off + n])
        coords.append(packed[4:7, off:off + n].T)
        off += n
    return VisualLayout(positions, image, prunable, source, coords, seq_len=visual.shape[1],
                        host_image=host_img, host_prunable=host_prunable)


def full_attention_mask(mask: Any) -> torch.Tensor:
    """The full-attention entry of a per-attention-type mask dict (Qwen-VL under a static cache), or ``mask``."""
    if isinstance(mask, dict):
        return mask.get("full_attention", next(iter(mask.values())))
    return mask


def validity_from_4d(mask: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n]`` long validity of a prefill from generate()'s 4D mask ``[B, 1, n, L]`` (a static cache's): the
    last prompt row attends exactly to the real tokens before it (bool: True attends; float: 0 attends)."""
    row = mask[:, 0, n - 1, :n]
    return (row if row.dtype == torch.bool else row == 0).long()


def _query_length(kwargs: dict[str, Any]) -> int:
    ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    return int(ref.shape[1]) if ref is not None else 0


def is_static_cache(cache: Any) -> bool:
    """Whether ``cache`` is a transformers-5 cache whose layers are all full-attention static layers."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    from transformers.cache_utils import StaticLayer

    return all(type(layer) is StaticLayer for layer in layers)


def check_cache(cache: Any, uniform: bool = False) -> None:
    """Only a plain DynamicCache (full-attention layers) can hold layers of different lengths; when every
    layer keeps the same tokens (``uniform``: pruning before the LLM only) a full-attention StaticCache works
    too."""
    if cache is None:
        return
    from transformers.cache_utils import DynamicCache

    if isinstance(cache, (tuple, list)):  # transformers 4.x legacy cache: one (key, value) pair per layer
        ok = all(isinstance(entry, (tuple, list)) and len(entry) == 2 for entry in cache)
    elif not hasattr(cache, "layers"):  # transformers 4.x DynamicCache: per-layer key/value lists
        ok = type(cache) is DynamicCache
    else:
        from transformers.cache_utils import DynamicLayer

        ok = isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)
        ok = ok or (uniform and is_static_cache(cache))
    if not ok:
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
        static = ("a full-attention StaticCache (cache_implementation='static') works with methods that prune "
                  "before the LLM only (cls, random, uniform, visionzip, divprune, ...); " if not uniform else "")
        raise UnsupportedModelError(
            f"vtprune supports only DynamicCache with full-attention layers, got {type(cache).__name__} "
            f"(layers: {kinds or 'n/a'}). Pruned layers cache fewer entries than unpruned ones, which "
            "static, quantized, offloaded and sliding-window caches cannot hold; "
            f"{static}otherwise use the default cache (do not pass cache_implementation=...) or pass a DynamicCache()."
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
    cls = _ADAPTERS[model_type]
    check_transformers(cls)
    return cls(model)


def transformers_version() -> tuple[int, ...]:
    import transformers

    return tuple(int(p) for p in re.findall(r"\d+", transformers.__version__)[:3])


def check_transformers(cls: type[Adapter]) -> None:
    """A clear error when the installed transformers is older than the adapter needs."""
    import transformers

    need = tuple(int(p) for p in cls.min_transformers.split("."))
    if transformers_version()[: len(need)] < need:
        raise UnsupportedModelError(
            f"the {cls.description} adapter needs transformers>={cls.min_transformers}, but "
            f"{transformers.__version__} is installed: pip install 'transformers>={cls.min_transformers}' "
            "(only the original LLaVA codebase's adapter, model type llava_llama, runs on transformers 4.37)"
        )


def check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer <= n_layers - 2:
        raise ConfigError(
            f"layer={layer} is out of range for a language model with {n_layers} decoder layers: "
            f"in-LLM pruning needs 0 <= layer <= {n_layers - 2} (some layer must run after the pruning point)"
        )
