"""DyVTE visual-token exit: the fixed and the adaptive rule against hand computations from the unpatched
model, decoding after an exit, budget semantics. Drop == mask on every tiny model is in tests/test_presets.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import batch, get_model, qwen_batch
from oracle import dropped_positions, staged_masked_logits

import vtprune
from vtprune.config import ConfigError


def _visual(model, ids: torch.Tensor) -> torch.Tensor:
    return ids == model.config.image_token_id


def _masses(model, inputs) -> torch.Tensor:
    """``[layers, B]``: the last prompt token's head-mean attention summed over the visual tokens, per layer,
    from the unpatched eager model."""
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    vis = _visual(model, inputs["input_ids"])
    rows = []
    for att in out.attentions:  # [B, heads, N, N]
        last = att[:, :, -1, :].float().mean(1)  # left padding: the last column is every sample's last token
        rows.append((last * vis).sum(1))
    return torch.stack(rows)


def test_fixed_exit_drops_every_visual_token_after_the_layer(processor):
    model = get_model("llava")
    inputs = batch(processor, [1, 2])
    with torch.no_grad():
        vtprune.apply(model, "dyvte", layer=1)
        pruned = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert st.visual_after == [0, 0] and st.exit_layers == [1, 1] and st.visual_before == [576, 1152]
    hidden = _visual(model, inputs["input_ids"])
    expected = staged_masked_logits(model, inputs, [(1, hidden)])
    check = inputs["attention_mask"].bool() & ~hidden
    torch.testing.assert_close(pruned[check], expected[check], atol=2e-5, rtol=1e-4)
    # decoding continues without the visual tokens: each generated token is the masked model's greedy choice
    n = inputs["input_ids"].shape[1]
    full = {**inputs, "input_ids": tokens,
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(2, tokens.shape[1] - n, dtype=torch.long)], 1)}
    hidden_full = torch.cat([hidden, torch.zeros(2, tokens.shape[1] - n, dtype=torch.bool)], 1)
    oracle = staged_masked_logits(model, full, [(1, hidden_full)])
    assert torch.equal(oracle[:, n - 1:-1].argmax(-1), tokens[:, n:])


def test_default_exit_is_vtw_layer_scaled_to_depth(llava):
    vtprune.apply(llava, "dyvte")
    scorer = llava._vtprune_state.scorer
    vtprune.remove(llava)
    assert scorer.default_layer == 2  # 14 of 32 (VTW's k = 15 input) -> round(14 * 4 / 32)
    from vtprune.scorers.staged import depth_scaled
    assert depth_scaled("dyvte", [14], 32) == [14] and depth_scaled("dyvte", [14], 28) == [12]


def test_adaptive_exit_is_the_first_layer_below_the_threshold(processor):
    model = get_model("llava", "eager")
    inputs = batch(processor, [1, 1])
    masses = _masses(model, inputs)  # [4, 2]
    # a threshold between the two samples' masses at layer 1 (the samples differ: different images)
    lo, hi = sorted(masses[1].tolist())
    assert hi - lo > 1e-4
    t = (lo + hi) / 2
    expected = []
    for b in range(2):
        below = [li for li in range(3) if masses[li, b] < t]  # candidates 0..2 on a 4-layer model
        expected.append(below[0] if below else None)
    assert expected[0] != expected[1]  # one sample exits, the other does not (or later): both branches run
    with torch.no_grad():
        vtprune.apply(model, "dyvte", threshold=t)
        pruned = model(**inputs).logits
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert st.exit_layers == expected
    assert [a == 0 for a in st.visual_after] == [e is not None for e in expected]
    stages = [(s["layer"], dropped_positions(model, inputs["input_ids"], dataclasses.replace(st, kept=s["kept"])))
              for s in st.stages]
    reference = staged_masked_logits(model, inputs, stages)
    check = inputs["attention_mask"].bool() & ~stages[-1][1]
    torch.testing.assert_close(pruned[check], reference[check], atol=3e-5, rtol=1e-4)


def test_adaptive_threshold_extremes(processor):
    model = get_model("llava")
    inputs = batch(processor, [1, 1])
    with torch.no_grad():
        vtprune.apply(model, "dyvte", threshold=0.999)  # every mass is below: exit at the first candidate
        model(**inputs)
        first = vtprune.stats(model).exit_layers
        vtprune.apply(model, "dyvte", threshold=1e-6)  # none is: every visual token stays
        model(**inputs)
        none = vtprune.stats(model)
    vtprune.remove(model)
    assert first == [0, 0]
    assert none.exit_layers == [None, None] and none.visual_after == none.visual_before


def test_keep_all_is_identity_and_counts_are_refused(processor):
    model = get_model("llava")
    inputs = batch(processor, [1])
    with torch.no_grad():
        ref = model(**inputs).logits
        vtprune.apply(model, "dyvte", keep=1.0)
        same = model(**inputs).logits
        st = vtprune.stats(model)
        with pytest.raises(ConfigError, match="an exit keeps no visual token"):
            vtprune.apply(model, "dyvte", keep=64)
    vtprune.remove(model)
    torch.testing.assert_close(same, ref, atol=1e-5, rtol=0)
    assert st.exit_layers == [None]


def test_options_are_checked(llava):
    with pytest.raises(ConfigError, match="threshold"):
        vtprune.apply(llava, "dyvte", threshold=2.0)
    with pytest.raises(ConfigError, match="give threshold=t with them"):
        vtprune.apply(llava, "dyvte", candidates=[1, 2])
    with pytest.raises(ConfigError, match="must lie in 0..2"):
        vtprune.apply(llava, "dyvte", threshold=0.1, candidates=[1, 3])
    with pytest.raises(ConfigError, match="instead of layer=2"):
        vtprune.apply(llava, "dyvte", threshold=0.1, candidates=[0, 1], layer=2)


def test_qwen3_exit_waits_for_deepstack():
    model = get_model("qwen3_vl")
    inputs = qwen_batch("qwen3_vl", "left_padded_2")
    with torch.no_grad():
        vtprune.apply(model, "dyvte")
        model(**inputs)
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert st.visual_after == [0, 0] and all(k is not None and k >= 2 for k in st.exit_layers)


def test_tune_searches_the_threshold(llava):
    vtprune.apply(llava, "dyvte", threshold=0.1)
    state = llava._vtprune_state
    space = state.scorer.tunable(llava, state.adapter)
    vtprune.remove(llava)
    assert set(space) == {"threshold"} and space["threshold"][1] == 0.1
