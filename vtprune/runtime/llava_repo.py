"""The runtime of the original LLaVA codebase: pruning where the repository builds the LLM input.

The repository splices image features into the prompt inside ``prepare_inputs_labels_for_multimodal``;
this runtime wraps that method on the instance and calls it with probe labels (see
`vtprune.adapters.llava_repo`, which describes the model). Pre-LLM methods shorten the spliced prompt
right there, so everything downstream (transformers 4.37's generate included) sees one consistent,
shorter prompt; LLM stages after the pre-LLM one (VFlowOpt) then run on that shorter prompt as its
prefill; in-LLM methods hand the spliced prompt to the shared runtime's LLM forward.
"""

from __future__ import annotations

from typing import Any

import torch

from vtprune.adapters.base import ImageInputs
from vtprune.adapters.llava_repo import (
    IGNORE_INDEX,
    LlavaRepoAdapter,
    RepoPrefill,
    moved_labels,
    tiles_per_image,
)
from vtprune.kernels import compact
from vtprune.perthread import PerThread
from vtprune.runtime.cache import check_cache
from vtprune.runtime.hooks import Runtime, _InstanceWrap, register_runtime
from vtprune.runtime.pre_llm import shorten_prefill_inputs
from vtprune.scorers.base import INSTRUCTION
from vtprune.signals import PRE_LLM
from vtprune.state import PruneState, Session, cache_of


@register_runtime(LlavaRepoAdapter)
class RepoRuntime(Runtime):
    """The shared runtime plus the wrapped ``prepare_inputs_labels_for_multimodal``."""

    adapter: LlavaRepoAdapter
    # per thread: the shortened inputs_embeds of a prefill whose LLM stages are still to run (VFlowOpt)
    _llm_prefill = PerThread()

    def extra_hooks(self, state: PruneState) -> list:
        return [_InstanceWrap(self.adapter.model, "prepare_inputs_labels_for_multimodal", self._make_prepare(state))]

    def label_hooks(self, state: PruneState) -> list:
        """None: the wrapped ``prepare_inputs_labels_for_multimodal`` moves the labels itself."""
        return []

    def _make_prepare(self, state: PruneState):
        adapter = self.adapter
        runtime = self

        def wrapper(original, input_ids, position_ids, attention_mask, past_key_values, labels, images,
                    image_sizes=None):
            args = (input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes)
            if (not state.enabled or images is None or input_ids is None or input_ids.shape[1] == 1
                    or adapter._tower() is None):
                return original(*args)
            mask_in = (attention_mask.bool() if attention_mask is not None
                       else torch.ones_like(input_ids, dtype=torch.bool))
            probe = torch.zeros_like(input_ids)  # text: 0; the method marks spliced features IGNORE_INDEX
            state.vision_record = None
            _, pos, mask_out, cache, embeds, probe_out = original(
                input_ids, position_ids, mask_in, past_key_values, probe, images, image_sizes)
            valid = mask_out.bool()
            visual = (probe_out == IGNORE_INDEX) & valid
            prefill = RepoPrefill(embeds, visual, tiles_per_image(images), state.vision_record)
            new_labels = None if labels is None else moved_labels(labels, input_ids, mask_in, probe_out, valid)
            mask_ret = None if attention_mask is None else mask_out.to(attention_mask.dtype)
            if state.stage == PRE_LLM and bool(visual.any()):
                # the prompt's text ids at their spliced positions (visual slots -100): the instruction
                # ids of methods that read them (cdpruner's relevance='clip')
                ids = (moved_labels(input_ids, input_ids, mask_in, probe_out, valid).clamp(min=0)
                       if state.scorer.needs_signal(INSTRUCTION) else None)
                return runtime._shorten(state, prefill, valid, pos, mask_ret, cache, new_labels, ids)
            adapter._pending = prefill  # in-LLM pruning: the LLM forward that follows picks it up
            return None, pos, mask_ret, cache, embeds, new_labels

        return wrapper

    def _shorten(self, state: PruneState, prefill: RepoPrefill, valid: torch.Tensor, pos: Any, mask: Any,
                 cache: Any, labels: torch.Tensor | None, input_ids: torch.Tensor | None = None) -> tuple:
        """Pre-LLM pruning, done where the repository builds the LLM input.

        The shortened ``inputs_embeds``, mask, positions and labels go back to the caller (``forward`` or
        ``generate``), so everything downstream (transformers 4.37's generate, which sizes decode inputs
        from the cache length, included) sees one consistent, shorter prompt and needs no remapping.

        With LLM stages to follow (``state.schedule``: VFlowOpt), the session stays, re-based on the
        shortened prompt (`continue_in_llm`), for the LLM forward that receives exactly these
        ``inputs_embeds`` (`_on_forward` recognises it); its decode steps need no mapping either.
        """
        sess = state.session = Session()
        images = ImageInputs(None, prefill.tiles, None, None, prefill.record)
        self.begin_prefill(sess, valid, prefill.visual.long(), images)
        kwargs = {"inputs_embeds": prefill.embeds, "attention_mask": mask, "position_ids": pos, "input_ids": input_ids}
        shorten_prefill_inputs(self.adapter, state, kwargs, images, prefill.visual, trim_padding=True)
        if labels is not None:
            labels = compact(labels, sess.pre_index).masked_fill(~sess.pre_valid, IGNORE_INDEX)
        embeds = kwargs["inputs_embeds"]
        if state.schedule:
            # the LLM sees the shortened prompt as its whole prefill: nothing maps back to the spliced one
            sess.pre_index = None
            sess.seq_len = sess.llm_len
            self._llm_prefill = embeds
        else:
            state.session = Session()  # nothing to remap later: the LLM runs a plain, shorter prompt
        return None, kwargs.get("position_ids"), kwargs.get("attention_mask"), cache, embeds, labels

    def _on_forward(self, state: PruneState, kwargs: dict[str, Any]):
        if state.stage != PRE_LLM:
            return super()._on_forward(state, kwargs)
        # pruned in prepare_inputs_labels_for_multimodal already
        cache = cache_of(kwargs)
        prepared, self._llm_prefill = self._llm_prefill, None
        embeds = kwargs.get("inputs_embeds")
        if (prepared is not None and embeds is not None and embeds.shape == prepared.shape
                and embeds.data_ptr() == prepared.data_ptr()):
            check_cache(cache)  # the prefill of the LLM stages (session re-based)
            state.session.cache = cache
            return None
        if state.schedule and self._continues(state.session, cache, kwargs):
            return super()._on_forward(state, kwargs)  # a decode step after those LLM stages (or a pass-through)
        check_cache(cache)
        if state.schedule:
            state.session = Session()  # any other forward runs unpruned
        return None

