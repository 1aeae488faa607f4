"""Exactness on tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL: keep-all, drop == mask, pre-LLM == shortened LM.

The pre-LLM reference is built from the *unpatched* model: a hook on its language model captures the
embeddings, the 3-D M-RoPE positions (and Qwen3-VL's deepstack inputs) of the full prompt; the test
removes the dropped columns itself and runs the language model on what is left, then decodes greedily
with positions continuing after the prompt's last position, as the unpruned model does.
"""

from __future__ import annotations

import pytest
import torch
from conftest import get_model, qwen_batch
from oracle import dropped_positions, masked_logits
from transformers.cache_utils import DynamicCache

import vtprune
from vtprune.adapters.attention_rows import vit_received_attention
from vtprune.adapters.qwen import window_order
from vtprune.config import ConfigError

KINDS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
NO_EOS = 10_000  # an id outside the vocabulary: decode the full length, like the reference loop
LAYER = 2  # the tiny models have 4 decoder layers; Qwen3-VL's 2 deepstack layers allow K >= 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["left_padded_2", "mixed"])
@pytest.mark.parametrize("method,layer", [("fastv", LAYER), ("cls", None)])
def test_keep_all_is_identical(kind, case, method, layer):
    model = get_model(kind)
    inputs = qwen_batch(kind, case)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        vtprune.apply(model, method=method, keep=1.0, layer=layer)
        out = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert st.visual_after == st.visual_before
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case,attn", [("single", "sdpa"), ("left_padded_2", "sdpa"), ("two_images", "sdpa"),
                                       ("video", "sdpa"), ("mixed", "sdpa"), ("left_padded_2", "eager")])
def test_in_llm_drop_equals_masking(kind, case, attn):
    model = get_model(kind, attn)
    inputs = qwen_batch(kind, case)
    vtprune.apply(model, method="fastv", keep=12, layer=LAYER)
    with torch.no_grad():
        pruned = model(**inputs).logits
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert st.stage == "llm" and st.layer == LAYER
    dropped = dropped_positions(model, inputs["input_ids"], st)
    n_items = {"single": 1, "left_padded_2": 1, "two_images": 2, "video": 1, "mixed": 2}[case]
    assert st.visual_after == [12 * n_items] * len(st.visual_after)
    ref = masked_logits(model, inputs, LAYER, dropped)
    check = inputs["attention_mask"].bool() & ~dropped
    torch.testing.assert_close(pruned[check], ref[check], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["left_padded_2", "mixed"])
def test_generate_with_cache_matches_masking(kind, case):
    """Decode after in-LLM pruning continues exactly as the masked reference (original 3-D positions)."""
    model = get_model(kind)
    inputs = qwen_batch(kind, case)
    vtprune.apply(model, method="fastv", keep=10, layer=LAYER)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    st = vtprune.stats(model)
    vtprune.remove(model)
    n = inputs["input_ids"].shape[1]
    new = out.sequences.shape[1] - n
    full = dict(inputs)
    full["input_ids"] = out.sequences
    ones = torch.ones(out.sequences.shape[0], new, dtype=inputs["attention_mask"].dtype)
    full["attention_mask"] = torch.cat([inputs["attention_mask"], ones], 1)
    full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ones).to(
        inputs["mm_token_type_ids"].dtype)], 1)
    dropped = torch.cat([dropped_positions(model, inputs["input_ids"], st), torch.zeros_like(ones, dtype=torch.bool)], 1)
    ref = masked_logits(model, full, LAYER, dropped)
    for i, step in enumerate(out.logits):
        torch.testing.assert_close(step, ref[:, n - 1 + i], atol=3e-5, rtol=1e-4)


# ---- pre-LLM: the unpatched language model on the shortened sequence --------------------------------
def _capture_llm_inputs(model, inputs) -> dict:
    """What the unpatched model hands its language model for ``inputs`` (embeds, 3-D positions, deepstack)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen


def _shortened_reference(model, inputs, st, new_tokens: int):
    """Logits of the unpatched LM on the kept tokens (original positions), then greedy decode steps."""
    seen = _capture_llm_inputs(model, inputs)
    embeds, pos = seen["inputs_embeds"], seen["position_ids"][-3:]
    dropped = dropped_positions(model, inputs["input_ids"], st)
    attn = inputs["attention_mask"]
    rows = [torch.nonzero(~dropped[b]).flatten() for b in range(dropped.shape[0])]
    width = max(len(r) for r in rows)
    bsz = len(rows)
    short = embeds.new_zeros(bsz, width, embeds.shape[-1])
    mask = torch.zeros(bsz, width, dtype=torch.long)
    spos = torch.zeros(3, bsz, width, dtype=pos.dtype)
    kept_visual = torch.zeros(bsz, width, dtype=torch.bool)
    full_visual = seen.get("visual_pos_masks")
    for b, r in enumerate(rows):  # left padding, as vtprune re-pads an unpadded or left-padded batch
        sl = slice(width - len(r), width)
        short[b, sl] = embeds[b, r]
        mask[b, sl] = attn[b, r]
        spos[:, b, sl] = pos[:, b, r]
        if full_visual is not None:
            kept_visual[b, sl] = full_visual[b, r]
    lm_kwargs = {}
    if seen.get("deepstack_visual_embeds") is not None:
        keep_rows = ~dropped[full_visual]
        lm_kwargs = dict(visual_pos_masks=kept_visual,
                         deepstack_visual_embeds=[d[keep_rows] for d in seen["deepstack_visual_embeds"]])
    lm, head = model.model.language_model, model.lm_head
    cache = DynamicCache(config=model.config.get_text_config())
    logits_steps = []
    with torch.no_grad():
        h = lm(inputs_embeds=short, attention_mask=mask, position_ids=spos, past_key_values=cache,
               use_cache=True, **lm_kwargs).last_hidden_state
        logits = head(h)
        prefill = logits
        nxt_pos = pos.amax(dim=(0, 2)) + 1  # [B]: the unpruned model's next position
        step_logits = logits[:, -1]
        tokens = []
        for t in range(new_tokens):
            logits_steps.append(step_logits)
            tok = step_logits.argmax(-1)
            tokens.append(tok)
            mask = torch.cat([mask, torch.ones(bsz, 1, dtype=mask.dtype)], 1)
            p = (nxt_pos + t)[None, :, None].expand(3, bsz, 1)
            e = model.model.get_input_embeddings()(tok[:, None])
            h = lm(inputs_embeds=e, attention_mask=mask, position_ids=p, past_key_values=cache,
                   use_cache=True).last_hidden_state
            step_logits = head(h)[:, -1]
    return prefill, mask[:, :width].bool(), torch.stack(tokens, 1), logits_steps


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["single", "left_padded_2", "two_images", "video", "mixed"])
@pytest.mark.parametrize("method", ["cls", "uniform"])
def test_pre_llm_equals_shortened_sequence(kind, case, method):
    model = get_model(kind)
    inputs = qwen_batch(kind, case)
    vtprune.apply(model, method=method, keep=12)
    with torch.no_grad():
        pruned = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=NO_EOS)
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert st.stage == "pre-llm"
    ref, valid, ref_tokens, ref_steps = _shortened_reference(model, inputs, st, 4)
    assert pruned.shape[1] == ref.shape[1] < inputs["input_ids"].shape[1]
    torch.testing.assert_close(pruned[valid], ref[valid], atol=2e-5, rtol=1e-4)
    n = inputs["input_ids"].shape[1]
    assert torch.equal(gen.sequences[:, n:], ref_tokens)
    for a, b in zip(gen.logits, ref_steps):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_pre_llm_decode_without_generate(kind):
    """A hand-written decode loop (no position_ids) continues from the right positions via rope_deltas."""
    model = get_model(kind)
    inputs = qwen_batch(kind, "single")
    vtprune.apply(model, method="uniform", keep=8)
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=NO_EOS,
                             output_logits=True, return_dict_in_generate=True)
        out = model(**inputs, use_cache=True)
        steps, cache = [out.logits[:, -1]], out.past_key_values
        for i in range(2):
            tok = gen.sequences[:, inputs["input_ids"].shape[1] + i, None]
            # no attention_mask: transformers' Qwen-VL decode with a 2-D mask and no positions fails unpatched too
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            steps.append(out.logits[:, -1])
    vtprune.remove(model)
    for a, b in zip(steps, gen.logits):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-4)


# ---- the vision-side score (attention received) -------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_received_attention_matches_full_attention(kind):
    """The blockwise column means equal those of the full attention map, computed the plain way."""
    import importlib

    model = get_model(kind)
    inputs = qwen_batch(kind, "two_images")
    block = model.model.visual.blocks[-1]
    seen = {}

    def hook(module, args, kwargs):
        seen["hidden"], seen["kwargs"] = args[0], kwargs

    handle = block.attn.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    handle.remove()
    attn, hidden, kw = block.attn, seen["hidden"], seen["kwargs"]
    got = vit_received_attention(attn, hidden, kw["cu_seqlens"], kw["position_embeddings"], query_block=7)
    mod = importlib.import_module(type(model).__module__)
    s = hidden.shape[0]
    with torch.no_grad():
        q, k, _ = attn.qkv(hidden).reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = kw["position_embeddings"]
        q, k = mod.apply_rotary_pos_emb_vision(q, k, cos, sin)
    want = torch.zeros(s)
    bounds = kw["cu_seqlens"].tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        p = torch.softmax(torch.einsum("qhd,khd->hqk", q[a:b].float(), k[a:b].float()) * attn.scaling, -1)
        want[a:b] = p.mean(dim=(0, 1))
    assert len(bounds) == 3  # two images
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_window_order_matches_qwen25():
    from transformers.vision_utils import get_vision_window_index

    grid = torch.tensor([[1, 18, 26], [2, 14, 18], [1, 8, 8]])
    ref, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=112, patch_size=14)
    assert torch.equal(window_order(grid, 2, 112, 14), ref)


def test_qwen25_scores_are_in_raster_order():
    """A planted case: one merge group gets all the attention; the recorded score must land on its token."""
    model = get_model("qwen2_5_vl")
    inputs = qwen_batch("qwen2_5_vl", "single")
    vtprune.apply(model, method="cls", keep=1)
    adapter = model._vtprune_state.adapter
    grid = inputs["image_grid_thw"]
    order = window_order(grid, 2, 112, 14)
    target = 37  # raster index of the merged token to plant
    win_pos = int(torch.nonzero(order == target))
    planted = torch.zeros(int(grid.prod()))
    planted[4 * win_pos: 4 * win_pos + 4] = 1.0  # the 4 patches of its merge group, in window order
    scores = adapter.finish_vision_scores("image", planted, {"image_grid_thw": grid})
    vtprune.remove(model)
    assert scores.shape == (int(grid.prod()) // 4, 1)
    assert int(scores.flatten().argmax()) == target and float(scores.sum()) == 1.0


def test_pre_llm_keeps_whole_merge_groups_with_original_positions():
    model = get_model("qwen2_vl")
    inputs = qwen_batch("qwen2_vl", "single")
    seen = {}
    model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.update(k), with_kwargs=True)
    vtprune.apply(model, method="cls", keep=10)
    with torch.no_grad():
        model(**inputs)
    st = vtprune.stats(model)
    vtprune.remove(model)
    model.model.language_model._forward_pre_hooks.clear()
    pos = seen["position_ids"]
    assert pos.shape[0] == 3 and seen["inputs_embeds"].shape[1] == inputs["input_ids"].shape[1] - (
        st.visual_before[0] - 10)
    full = _capture_llm_inputs(model, inputs)["position_ids"][-3:]
    visual = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    start = int(visual[0])
    kept_cols = torch.cat([torch.arange(start), visual[st.kept[0]], torch.arange(int(visual[-1]) + 1,
                                                                                 inputs["input_ids"].shape[1])])
    assert torch.equal(pos[:, 0], full[:, 0, kept_cols])  # text after the image keeps its positions


# ---- configuration errors and generate() variants ----------------------------------------------
def test_qwen3_refuses_layers_before_deepstack():
    model = get_model("qwen3_vl")
    with pytest.raises(ConfigError, match="deepstack"):
        vtprune.apply(model, method="fastv", keep=8, layer=1)
    vtprune.apply(model, method="fastv", keep=8)  # the default layer moves after the deepstack layers
    assert model._vtprune_state.layer >= len(model.config.vision_config.deepstack_visual_indexes)
    vtprune.remove(model)


def test_qwen25_vision_layer_must_be_full_attention():
    model = get_model("qwen2_5_vl")
    with pytest.raises(ValueError, match="full-attention"):
        vtprune.apply(model, method="cls", keep=8, vision_layer=1)  # block 0 uses window attention
    vtprune.apply(model, method="cls", keep=8, vision_layer=[2, -1])  # blocks 1 and 3: full attention
    vtprune.remove(model)


def test_missing_image_input_is_a_clear_error():
    model = get_model("qwen2_vl")
    inputs = qwen_batch("qwen2_vl", "single")
    vtprune.apply(model, method="fastv", keep=8, layer=LAYER)
    try:
        with pytest.raises(ValueError, match="image_pad"):
            model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    finally:
        vtprune.remove(model)


@pytest.mark.parametrize("kind", KINDS)
def test_num_return_sequences(kind):
    model = get_model(kind)
    inputs = qwen_batch(kind, "mixed")
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
        vtprune.apply(model, method="cls", keep=1.0)
        out = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
        vtprune.apply(model, method="cls", keep=6)
        pruned = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert torch.equal(out, ref)
    assert pruned.shape[0] == 2 and st.visual_after == [12, 12]
