"""Exactness on tiny LLaVA-1.5 and LLaVA-NeXT models: keep-all, drop == mask, pre-LLM == shortened LM."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, get_model
from oracle import dropped_positions, masked_logits

import vtprune

CASES = {
    "single": dict(n_images=[1]),
    "left_padded_2": dict(n_images=[1, 1], padding_side="left"),
    "right_padded_2": dict(n_images=[1, 1], padding_side="right"),
    "two_images": dict(n_images=[2]),
    "ragged_images": dict(n_images=[2, 1], padding_side="left"),
}


def make_inputs(kind: str, case: str, processor, next_processor):
    spec = dict(CASES[case])
    proc = next_processor if kind == "next" else processor
    sizes = ((400, 500), (300, 620)) if kind == "next" else ((400, 500),)
    return batch(proc, spec.pop("n_images"), sizes=sizes, **spec)


@pytest.mark.parametrize("kind", ["llava", "next"])
@pytest.mark.parametrize("method", ["fastv", "cls", "random", "uniform"])
def test_keep_all_is_identical(kind, method, processor, next_processor):
    model = get_model(kind)
    inputs = make_inputs(kind, "left_padded_2" if kind == "llava" else "single", processor, next_processor)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        vtprune.apply(model, method=method, keep=1.0)
        out = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    vtprune.remove(model)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    st = vtprune.stats(model)
    assert st is None  # removed


@pytest.mark.parametrize(
    "kind,case,attn",
    [
        ("llava", "single", "sdpa"),
        ("llava", "left_padded_2", "sdpa"),
        ("llava", "right_padded_2", "sdpa"),
        ("llava", "two_images", "sdpa"),
        ("llava", "ragged_images", "sdpa"),
        ("llava", "left_padded_2", "eager"),
        ("llava", "ragged_images", "eager"),
        ("next", "single", "sdpa"),
        ("next", "left_padded_2", "sdpa"),
    ],
)
@pytest.mark.parametrize("method,layer", [("fastv", 1), ("random", 2)])
def test_in_llm_drop_equals_masking(kind, case, attn, method, layer, processor, next_processor):
    model = get_model(kind, attn)
    inputs = make_inputs(kind, case, processor, next_processor)
    vtprune.apply(model, method=method, keep=40, layer=layer)
    with torch.no_grad():
        pruned = model(**inputs).logits
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert st.stage == "llm" and st.layer == layer
    dropped = dropped_positions(model, inputs["input_ids"], st)
    assert int(dropped.sum()) > 0
    ref = masked_logits(model, inputs, layer, dropped)
    assert pruned.shape == ref.shape
    check = inputs["attention_mask"].bool() & ~dropped
    torch.testing.assert_close(pruned[check], ref[check], atol=2e-5, rtol=1e-4)
    # the logits generate() reads: last real token of each sample
    last = inputs["attention_mask"].shape[1] - 1 - inputs["attention_mask"].flip(1).argmax(1)
    b = torch.arange(pruned.shape[0])
    assert torch.equal(pruned[b, last].argmax(-1), ref[b, last].argmax(-1))


@pytest.mark.parametrize("case", ["single", "left_padded_2", "ragged_images"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_with_cache_matches_masking(case, attn, processor, next_processor):
    """Decode steps after in-LLM pruning (layers <= K cache N entries, later layers N') match the oracle."""
    model = get_model("llava", attn)
    inputs = make_inputs("llava", case, processor, next_processor)
    vtprune.apply(model, method="fastv", keep=24, layer=1)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    st = vtprune.stats(model)
    vtprune.remove(model)
    n = inputs["input_ids"].shape[1]
    full = dict(inputs)
    full["input_ids"] = out.sequences
    new = out.sequences.shape[1] - n
    full["attention_mask"] = torch.cat(
        [inputs["attention_mask"], torch.ones(out.sequences.shape[0], new, dtype=torch.long)], 1
    )
    dropped = torch.cat([dropped_positions(model, inputs["input_ids"], st), torch.zeros_like(
        full["attention_mask"][:, n:], dtype=torch.bool)], 1)
    # generate's positions follow the attention mask; the oracle must use the same
    pos = (full["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    ref = masked_logits(model, {**full, "position_ids": pos}, 1, dropped)
    for i, step in enumerate(out.logits):
        torch.testing.assert_close(step, ref[:, n - 1 + i], atol=3e-5, rtol=1e-4)


def shortened_reference(model, inputs, st):
    """Run the unpatched LM on the embedding sequence with the dropped image tokens removed."""
    core = model.model
    with torch.no_grad():
        feats = core.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs.get("image_sizes"), return_dict=True
        ).pooler_output
        embeds = core.get_input_embeddings()(inputs["input_ids"])
        visual = inputs["input_ids"] == model.config.image_token_id
        embeds = embeds.masked_scatter(visual[..., None].expand_as(embeds), torch.cat(list(feats)))
    dropped = dropped_positions(model, inputs["input_ids"], st)
    rows = [torch.nonzero(~dropped[b]).flatten() for b in range(dropped.shape[0])]
    width = max(len(r) for r in rows)
    short = torch.zeros(len(rows), width, embeds.shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):  # left padding, as vtprune re-pads an unpadded or left-padded batch
        short[b, width - len(r):] = embeds[b, r]
        mask[b, width - len(r):] = inputs["attention_mask"][b, r]
    return short, mask


@pytest.mark.parametrize("kind", ["llava", "next"])
@pytest.mark.parametrize("case", ["single", "left_padded_2", "two_images", "ragged_images"])
@pytest.mark.parametrize("method", ["cls", "uniform"])
def test_pre_llm_equals_shortened_sequence(kind, case, method, processor, next_processor):
    model = get_model(kind)
    inputs = make_inputs(kind, case, processor, next_processor)
    vtprune.apply(model, method=method, keep=32)
    with torch.no_grad():
        pruned = model(**inputs).logits
        pruned_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert st.stage == "pre-llm"
    short, mask = shortened_reference(model, inputs, st)
    assert pruned.shape[1] == short.shape[1] < inputs["input_ids"].shape[1]
    with torch.no_grad():
        ref = model(inputs_embeds=short, attention_mask=mask).logits
        ref_gen = model.generate(inputs_embeds=short, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
    valid = mask.bool()
    torch.testing.assert_close(pruned[valid], ref[valid], atol=2e-5, rtol=1e-4)
    n = inputs["input_ids"].shape[1]
    assert torch.equal(pruned_gen.sequences[:, n:], ref_gen.sequences)
    for a, b in zip(pruned_gen.logits, ref_gen.logits):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-4)
