"""``model(**inputs, labels=labels)`` under pruning (`vtprune.runtime.labels`): the loss of pre-LLM pruning is
the loss of the shortened sequence with each label moved with its token, as if built by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, get_model, qwen_batch
from oracle import dropped_positions, lm_on_kept

import vtprune
from vtprune.toy.tiny import tiny_llava_processor


def _placeholders(model, ids: torch.Tensor) -> torch.Tensor:
    return (ids == model.config.image_token_id) | (ids == getattr(model.config, "video_token_id", -1))


def _labels(model, inputs, visual_too: bool) -> torch.Tensor:
    """Labels = input ids, -100 on padding and on each row's first token (predicted from a padding slot,
    whose logits no model defines), and on visual tokens unless ``visual_too``."""
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    first = inputs["attention_mask"].long().argmax(1)
    labels[torch.arange(labels.shape[0]), first] = -100
    if not visual_too:
        labels[_placeholders(model, labels)] = -100
    return labels


def _reference_loss(model, inputs, labels, st) -> torch.Tensor:
    """The unpatched LM on the hand-shortened sequence, with the labels of the kept tokens."""
    logits, mask = lm_on_kept(model, inputs, st)
    dropped = dropped_positions(model, inputs["input_ids"], st)
    short = torch.full(mask.shape, -100, dtype=labels.dtype)
    for b in range(labels.shape[0]):
        cols = torch.nonzero(~dropped[b]).flatten()
        short[b, mask.shape[1] - cols.numel():] = labels[b, cols]
    return model.loss_function(logits=logits, labels=short, vocab_size=model.config.get_text_config().vocab_size)


def _inputs(kind: str, side: str):
    if kind.startswith("qwen"):
        return qwen_batch(kind, "left_padded_2", padding_side=side)
    return batch(tiny_llava_processor(next_=kind == "next"), [2, 1], padding_side=side)


CASES = [("llava", "cls", "left"), ("llava", "divprune", "right"), ("llava", "random", "left"),
         ("next", "cls", "left"), ("qwen2_vl", "cls", "left"), ("qwen2_vl", "uniform", "right")]


@pytest.mark.parametrize("visual_too", [False, True], ids=["text-labels", "all-labels"])
@pytest.mark.parametrize("kind,method,side", CASES, ids=[f"{k}-{m}-{s}" for k, m, s in CASES])
def test_pre_llm_loss_is_the_shortened_sequence_loss(kind, method, side, visual_too):
    model = get_model(kind)
    inputs = _inputs(kind, side)
    labels = _labels(model, inputs, visual_too)
    try:
        vtprune.apply(model, method=method, keep=5)
        with torch.no_grad():
            out = model(**inputs, labels=labels)
        st = vtprune.stats(model)
    finally:
        vtprune.remove(model)
    assert st.stage == "pre-llm" and out.logits.shape[1] < labels.shape[1]
    want = _reference_loss(model, inputs, labels, st)
    torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=1e-5)


def test_loss_leads_the_tuple_and_gradients_flow():
    model = get_model("llava")
    inputs = _inputs("llava", "left")
    labels = _labels(model, inputs, False)
    try:
        vtprune.apply(model, method="cls", keep=5)
        out = model(**inputs, labels=labels)
        as_tuple = model(**inputs, labels=labels, return_dict=False)
        out.loss.backward()
    finally:
        vtprune.remove(model)
        model.zero_grad(set_to_none=True)
    assert list(out.keys())[0] == "loss"
    torch.testing.assert_close(as_tuple[0], out.loss)
    assert as_tuple[1].shape == out.logits.shape


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_keep_all_and_text_only_losses_are_the_unpatched_ones(kind):
    model = get_model(kind)
    inputs = _inputs(kind, "left")
    labels = _labels(model, inputs, True)
    text = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    text["input_ids"] = text["input_ids"].masked_fill(_placeholders(model, text["input_ids"]), 7)  # text only
    with torch.no_grad():
        ref = model(**inputs, labels=labels).loss
        ref_text = model(**text, labels=labels).loss
    try:
        vtprune.apply(model, method="cls", keep=1.0)
        with torch.no_grad():
            same = model(**inputs, labels=labels).loss
        vtprune.apply(model, method="cls", keep=4)
        with torch.no_grad():
            text_loss = model(**text, labels=labels).loss
    finally:
        vtprune.remove(model)
    torch.testing.assert_close(same, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(text_loss, ref_text, atol=1e-6, rtol=0)


def test_in_llm_loss_is_the_masked_models_loss():
    """In-LLM pruning keeps every row: the loss is transformers' own over the returned logits."""
    model = get_model("llava")
    inputs = _inputs("llava", "left")
    labels = _labels(model, inputs, False)
    try:
        vtprune.apply(model, method="fastv", keep=5, layer=1)
        with torch.no_grad():
            out = model(**inputs, labels=labels)
    finally:
        vtprune.remove(model)
    want = model.loss_function(logits=out.logits, labels=labels, vocab_size=model.config.get_text_config().vocab_size)
    torch.testing.assert_close(out.loss, want)
