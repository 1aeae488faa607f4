"""The runtime: the hooks that thread one prefill's plan through the model, and its decode steps.

`Runtime` installs, on one patched model instance, everything a pruning setup needs:

- the core's forward pre-hook: reads the prefill's token kinds and validity once, builds the layout,
  shortens the sequence for pre-LLM methods (`vtprune.runtime.pre_llm`), and maps decode steps;
- the encoder wrappers that record each vision-encoder run (geometry, CLS rows, method extras);
- the decoder-layer hooks of in-LLM pruning (`vtprune.runtime.llm_stages`);
- the hooks of the method's own stage (`vtprune.runtime.stages`: VisionZip's keys, FlowCut's tower
  stages, staged methods' signals), declared by the method, never looked up by name.

The adapter only describes the model (parts, geometry, positions); nothing here is model-specific
except through it. Model types whose runtime differs (the original LLaVA codebase, where pruning happens
inside ``prepare_inputs_labels_for_multimodal``) register a subclass with `register_runtime`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from vtprune.adapters.base import Adapter
from vtprune.layout import last_true
from vtprune.perthread import PerThreadAttributes
from vtprune.runtime.cache import (
    check_cache,
    full_attention_mask,
    is_prepared_mask,
    is_static_cache,
    query_length,
    validity_from_4d,
)
from vtprune.runtime.continuation import begin_continuation
from vtprune.runtime.labels import LabelHooks
from vtprune.runtime.llm_stages import LLMStageHooks, check_attention
from vtprune.runtime.pre_llm import shorten_decode_inputs, shorten_prefill_inputs
from vtprune.runtime.stages import stage_for
from vtprune.signals import IN_LLM, PRE_LLM, VISION_CLS_ATTENTION
from vtprune.state import PruneState, Session, VisionRecord, cache_length, cache_of


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


def per_thread_model_state(adapter: Adapter) -> list:
    """Handles making the model's own per-call attributes (`Adapter.mutable_state`) per-thread."""
    names: dict[int, tuple[Any, list[str]]] = {}
    for obj, name in adapter.mutable_state():
        names.setdefault(id(obj), (obj, []))[1].append(name)
    return [PerThreadAttributes(obj, attrs) for obj, attrs in names.values()]


# the inputs generate() slices to the length of input_ids (transformers 5 `prepare_inputs_for_generation`)
_PER_TOKEN_INPUTS = ("position_ids", "token_type_ids", "mm_token_type_ids", "moe_mm_token_type_ids")


def skip_cached_tokens(sess: Session, kwargs: dict[str, Any]) -> None:
    """Drop the tokens a pre-LLM-pruned cache already holds from a decode step that feeds them again.

    ``generate(input_ids=<prompt + answer so far>, cache=<the earlier call's cache>)`` feeds the tokens
    after the first ``cache.get_seq_length()``, and a shortened cache is shorter than the sequence it
    caches, so that forward starts inside the prompt. The sequence's length after this step tells how many
    tokens are new (the session has seen ``seq_len + decoded``): the 2D mask's width, or, where generate()
    dropped an all-ones mask (no padding), the last position + 1 (one read, in multi-token steps only).
    Only the new tokens are kept (``[B, q, ...]`` inputs, position ids and token types along their last dim).
    """
    step = query_length(kwargs)
    if step <= 1:
        return
    mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        total = int(mask.shape[1])
    elif mask is None and isinstance(pos, torch.Tensor) and pos.dim() == 2:
        total = int(pos[0, -1]) + 1
    else:
        return
    new = total - sess.seq_len - sess.decoded
    if not 0 < new < step:
        return
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            kwargs[key] = kwargs[key][:, step - new:]
    for key in _PER_TOKEN_INPUTS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.shape[-1] == step:
            kwargs[key] = value[..., step - new:]


class Runtime:
    """The hooks of one pruning setup on one model (``adapter`` describes it, ``state`` holds the setup)."""

    def __init__(self, adapter: Adapter, state: PruneState) -> None:
        self.adapter = adapter
        self.state = state

    def install(self, state: PruneState) -> list:
        """Register every hook ``state`` needs; returns their handles (all or none are installed)."""
        core = self.adapter.core()
        # the mask form the LLM's layers take; an implementation that takes no mask is refused here
        state.attention_contract = check_attention(self.adapter.decoder_layers())
        method = stage_for(state.scorer)
        cls_modules = []
        if state.scorer.needs_signal(VISION_CLS_ATTENTION):
            cls_modules = [self.adapter.vision_attention(layer) for layer in self.cls_layers(state)]  # validates first
        handles: list = []
        try:
            handles.append(core.register_forward_pre_hook(self._make_pre_hook(state), with_kwargs=True))
            # the cache the LLM fills may be created inside its forward: record it at the first layer
            handles.append(self.adapter.decoder_layers()[0].register_forward_pre_hook(
                self._make_cache_hook(state), with_kwargs=True))
            handles.append(core.register_forward_hook(self._make_post_hook(state), with_kwargs=True))
            for modality, name in self.adapter.encoders.items():
                handles.append(_InstanceWrap(self.adapter.encoder_owner(), name, self._make_vision_wrapper(state, modality)))
            if state.stage == IN_LLM or state.schedule:  # in-LLM, or LLM stages after a pre-LLM one
                handles += LLMStageHooks(state, self.adapter.decoder_layers()).install()
            for module in cls_modules:
                handles.append(module.register_forward_pre_hook(self._make_cls_hook(state), with_kwargs=True))
            handles += self.adapter.extra_hooks(state, features=method.records_merge_features)
            handles += self.extra_hooks(state)
            if state.stage == PRE_LLM:
                handles += self.label_hooks(state)
            handles += method.hooks(self.adapter, state)  # the method's own (VisionZip's keys, FlowCut's stages)
            handles += per_thread_model_state(self.adapter)
        except Exception:
            for handle in reversed(handles):
                handle.remove()
            raise
        return handles

    def extra_hooks(self, state: PruneState) -> list:
        """Hooks of a model type whose runtime differs (`register_runtime` subclasses); default none."""
        return []

    def label_hooks(self, state: PruneState) -> list:
        """Hooks moving a forward's ``labels`` with the pre-LLM shortening (runtime/labels.py)."""
        return LabelHooks(self.adapter.model, state).install()

    def cls_layers(self, state: PruneState) -> list[int]:
        chosen = getattr(state.scorer, "vision_layer", None)
        if chosen is None:
            chosen = self.adapter.default_vision_layer()
        return [chosen] if isinstance(chosen, int) else list(chosen)

    def _make_cls_hook(self, state: PruneState):
        def hook(module, args, kwargs):
            if state.enabled:
                with state.timer.part("score"):
                    row = self.adapter.vision_score_row(module, args, kwargs)
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
            self.adapter.encoding_geometry = self.adapter.host_geometry(modality, bound)
            try:
                out = original(*args, **kwargs)
            finally:
                state.encoding = False
                self.adapter.encoding_geometry = None
            pooled = self.adapter.encoder_features(modality, out, bound)
            scores = state.cls_accumulator
            if scores is not None:
                scores = self.adapter.finish_vision_scores(modality, scores, bound)
            record = VisionRecord(
                output=out,
                geometry=self.adapter.record_geometry(modality, bound),
                strategy=bound.get("vision_feature_select_strategy"),
                n_images=len(pooled),
                cls_attention=scores,
                features=list(pooled),
                pixel_values=self.adapter.encoder_pixels(modality, bound),
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
            if sess.appended:  # a cacheless continuation: the model's stats stay its prompt's
                state.stats = sess.prompt_stats
            returned = cache_of(output) if isinstance(output, dict) else None
            if sess.phase in ("prefill", "decode") and isinstance(returned, (tuple, list)):
                sess.cache = returned
            return None

        return hook

    def _make_pre_hook(self, state: PruneState):
        signature = inspect.signature(self.adapter.core().forward)

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
            shortened = state.stage == PRE_LLM and sess.pre_index is not None
            if shortened:
                skip_cached_tokens(sess, kwargs)  # generate() restarting from this shortened cache
            step = query_length(kwargs)
            if shortened:
                shorten_decode_inputs(sess, kwargs)
                self.adapter.decode_positions(sess, kwargs)
                sess.decoded += step
                return (), kwargs
            sess.decoded += step
            return None
        # a new prefill (or a cacheless continuation of the previous one: runtime/continuation.py)
        check_cache(cache, uniform=state.uniform_cache)
        prev, prev_stats = state.session, state._stats
        sess = state.session = Session()
        input_ids = kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref is None:
            return None
        mask2d = kwargs.get("attention_mask")
        kinds = self.adapter.token_kinds(input_ids, embeds)
        if is_prepared_mask(mask2d):
            if is_static_cache(cache) and state.uniform_cache:  # generate() built the masks of a static cache
                mask2d = kwargs["attention_mask"] = validity_from_4d(full_attention_mask(mask2d), ref.shape[1])
            elif isinstance(mask2d, dict):
                mask2d = full_attention_mask(mask2d)
        if mask2d is not None and not (isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2):
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
        # (without a cache also the input ids, to recognise a continuation of the previous prompt)
        rows = [kinds, valid.to(kinds.dtype)]
        cacheless = cache is None and input_ids is not None
        if cacheless:
            rows.append(input_ids.to(kinds.dtype))
        # the call's small geometry tensors (image_sizes, grid_thw) ride along: the adapter keeps their host copies
        geometry = self.adapter.geometry_inputs(kwargs, (state.vision_record, state.video_record))
        flat = torch.cat([torch.stack(rows).flatten().long(), *(g.flatten().to(ref.device).long() for g in geometry)])
        flat = flat.cpu()
        host = flat[:len(rows) * kinds.numel()].view(len(rows), *kinds.shape).to(kinds.dtype)
        offset = len(rows) * kinds.numel()
        for g in geometry:
            self.adapter.keep_host_copy(g, flat[offset:offset + g.numel()].view(g.shape).to(g.dtype))
            offset += g.numel()
        host_kinds, host_valid = host[0], host[1].bool()
        if not bool(host_kinds.any()):
            state.stats = None
            return None
        if cacheless:
            begin_continuation(sess, prev, host[2], host_valid, host_kinds, prev_stats)
        images = self.adapter.image_inputs(state, kwargs)
        with state.timer.part("plan"):  # the layout: host-side work on the one host copy
            self.begin_prefill(sess, valid, kinds, images, host_kinds, host_valid)
        sess.cache = cache
        if state.stage == PRE_LLM:
            shorten_prefill_inputs(self.adapter, state, kwargs, images, kinds > 0)
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
                return int(mask.shape[1]) == sess.seq_len + sess.decoded + query_length(kwargs)
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
        sess.query_pos = last_true(valid) - sess.appended  # the prompt's last token (continuations: before theirs)
        sess.seq_len = sess.llm_len = int(valid.shape[1])
        sess.phase = "prefill"
        sess.kinds = kinds
        sess.host_kinds = host_kinds
        sess.layout = self.adapter.build_layout(images, host_kinds, kinds.device)


_RUNTIMES: dict[type, type[Runtime]] = {}


def register_runtime(adapter_cls: type[Adapter]):
    """Class decorator: use this `Runtime` subclass for models of ``adapter_cls`` (and its subclasses)."""
    def deco(cls: type[Runtime]) -> type[Runtime]:
        _RUNTIMES[adapter_cls] = cls
        return cls

    return deco


def install(adapter: Adapter, state: PruneState) -> list:
    """Install the runtime of ``state`` on ``adapter``'s model; returns the hook handles."""
    for klass in type(adapter).__mro__:
        if klass in _RUNTIMES:
            return _RUNTIMES[klass](adapter, state).install(state)
    return Runtime(adapter, state).install(state)
