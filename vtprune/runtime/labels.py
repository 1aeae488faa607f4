"""Training-style labels under pre-LLM shortening: ``model(**inputs, labels=labels)``.

Pre-LLM pruning hands the LLM a shorter sequence, so the logits the model returns are ``[B, N', V]``
while the caller's labels are ``[B, N]`` (lmms-eval's log-likelihood path, a fine-tuning loop). The
loss must be the one of the shortened sequence: each label moves with its token, labels of dropped
visual tokens disappear and re-padding slots are ignored, exactly as if the caller had built the
shortened sequence (and its labels) by hand.

The top-level forward's ``labels`` are taken out before it runs (so transformers computes no loss on
mismatched shapes) and the loss is computed after it, with the model's own ``loss_function``, on the
labels gathered through the prefill's ``pre_index``. A forward whose prefill shortened nothing (no
image, keep-all) gets the loss of its own labels. In-LLM pruning keeps every row, so its labels need
nothing; the LLaVA-repository runtime moves labels inside ``prepare_inputs_labels_for_multimodal``
itself and installs no hooks from here.
"""

from __future__ import annotations

from typing import Any

import torch

from vtprune.kernels import compact
from vtprune.state import PruneState

IGNORE_INDEX = -100  # transformers' loss ignores this label


def shortened_labels(labels: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``labels`` ``[B, N]`` at the rows of the shortened sequence: ``index`` ``[B, N']`` its original
    positions, ``valid`` ``[B, N']`` False on re-padding slots (labelled `IGNORE_INDEX`)."""
    moved = compact(labels, index.to(labels.device))
    return moved.masked_fill(~valid.to(labels.device), IGNORE_INDEX)


class LabelHooks:
    """The two hooks on the top-level model that move ``labels`` with a pre-LLM shortening."""

    def __init__(self, model: torch.nn.Module, state: PruneState) -> None:
        self.model = model
        self.state = state

    def install(self) -> list:
        return [self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
                self.model.register_forward_hook(self._post, with_kwargs=True)]

    def _pre(self, module, args, kwargs):
        labels = kwargs.get("labels")
        self.state.pending_labels = None
        if labels is None or not self.state.enabled:
            return None
        self.state.pending_labels = labels
        return args, {**kwargs, "labels": None}

    def _post(self, module, args, kwargs, output: Any):
        labels = self.state.pending_labels
        if labels is None:
            return None
        self.state.pending_labels = None
        sess = self.state.session
        as_tuple = isinstance(output, tuple)
        logits = output[0] if as_tuple else output["logits"]
        if sess.pre_index is not None and logits.shape[1] == sess.pre_index.shape[1]:
            labels = shortened_labels(labels, sess.pre_index, sess.pre_valid)
        vocab = self.model.config.get_text_config().vocab_size
        extra = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
        loss = self.model.loss_function(logits=logits, labels=labels, vocab_size=vocab, **extra)
        if as_tuple:  # return_dict=False: the loss leads, as transformers puts it
            return (loss, *output)
        return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})
