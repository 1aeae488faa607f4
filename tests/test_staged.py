"""Staged in-LLM pruning (several pruning points, each selecting among the tokens the earlier kept): the
staged masking oracle, generate() with the KV cache, ragged batches, and the stats."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, get_model, qwen_batch
from oracle import staged_masked_logits

import vtprune
from vtprune.config import ConfigError
from vtprune.scorers import Scorer, Signals
from vtprune.scorers.base import IN_LLM
from vtprune.toy.tiny import tiny_llava_processor


class StagedRandom(Scorer):
    """Seeded random scores at every stage of a fixed schedule (a test double for staged methods)."""

    name = "staged-random"
    description = "test double"
    stages = (IN_LLM,)
    default_layer = 0

    def __init__(self, plan=((0, 300), (2, None)), seed: int = 0) -> None:
        self.plan, self.seed, self.calls = plan, seed, []

    def schedule(self, model, adapter, layer, keep):
        return [(k, keep if n is None else n) for k, n in self.plan]

    def score(self, signals: Signals):
        self.calls.append((signals.stage_index, signals.layer, [int(p.numel()) for p in signals.layout.positions]))
        gen = torch.Generator().manual_seed(self.seed + 7 * signals.stage_index)
        return [torch.rand(int(p.numel()), generator=gen) for p in signals.layout.positions]


def dropped_after(model, input_ids, kept, visual_id):
    visual = input_ids == visual_id
    dropped = visual.clone()
    for b in range(input_ids.shape[0]):
        pos = torch.nonzero(visual[b]).flatten()
        dropped[b, pos[kept[b]]] = False
    return dropped


@pytest.mark.parametrize("kind,case", [("llava", [1]), ("llava", [2, 1]), ("qwen2_vl", "left_padded_2")])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_staged_drop_equals_staged_masking(kind, case, attn, processor):
    model = get_model(kind, attn)
    inputs = batch(processor, case) if kind == "llava" else qwen_batch(kind, case)
    scorer = StagedRandom(plan=((0, 0.5), (1, 0.25), (2, None)))
    vtprune.apply(model, scorer, keep=24)
    with torch.no_grad():
        pruned = model(**inputs).logits
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert [s["layer"] for s in st.stages] == [0, 1, 2] and st.layer == 0
    per_image = [len(x) for x in st.per_image]
    assert [c[2] for c in scorer.calls] != []
    vid = model.config.image_token_id
    # each stage keeps a subset of the previous one
    for a, b in zip(st.stages, st.stages[1:]):
        assert all(set(y.tolist()) <= set(x.tolist()) for x, y in zip(a["kept"], b["kept"]))
    assert st.stages[-1]["visual_after"] == st.visual_after
    # a float stage budget is a fraction of the tokens present at that stage; the last keeps `keep`
    counts = [s["visual_after"] for s in st.stages]
    assert all(a > b for a, b in zip(counts[0], counts[1])) and all(c <= 24 * n for c, n in zip(counts[2], per_image))
    stages = [(s["layer"], dropped_after(model, inputs["input_ids"], s["kept"], vid)) for s in st.stages]
    ref = staged_masked_logits(model, inputs, stages)
    check = inputs["attention_mask"].bool() & ~stages[-1][1]
    torch.testing.assert_close(pruned[check], ref[check], atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_staged_generate_matches_staged_masking(attn, processor):
    """Decode: layers (K_0, K_1] cache the first stage's tokens, later layers the second's."""
    model = get_model("llava", attn)
    inputs = batch(processor, [2, 1], padding_side="left")
    vtprune.apply(model, StagedRandom(plan=((0, 200), (2, None))), keep=16)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    st = vtprune.stats(model)
    vtprune.remove(model)
    n = inputs["input_ids"].shape[1]
    new = out.sequences.shape[1] - n
    full = dict(inputs)
    full["input_ids"] = out.sequences
    full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(out.sequences.shape[0], new,
                                                                              dtype=torch.long)], 1)
    pos = (full["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    vid = model.config.image_token_id
    stages = [(s["layer"], torch.cat([dropped_after(model, inputs["input_ids"], s["kept"], vid),
                                      torch.zeros(out.sequences.shape[0], new, dtype=torch.bool)], 1))
              for s in st.stages]
    ref = staged_masked_logits(model, {**full, "position_ids": pos}, stages)
    for i, step in enumerate(out.logits):
        torch.testing.assert_close(step, ref[:, n - 1 + i], atol=3e-5, rtol=1e-4)


def test_keep_all_staged_is_identical(processor):
    model = get_model("llava")
    inputs = batch(processor, [1, 1])
    with torch.no_grad():
        ref = model(**inputs).logits
        vtprune.apply(model, StagedRandom(plan=((0, None), (2, None))), keep=1.0)
        out = model(**inputs).logits
    vtprune.remove(model)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_schedule_layers_are_checked(llava):
    with pytest.raises(ConfigError, match="distinct and increasing"):
        vtprune.apply(llava, StagedRandom(plan=((2, 100), (1, None))), keep=8)
    with pytest.raises(ConfigError, match="out of range"):
        vtprune.apply(llava, StagedRandom(plan=((1, 100), (3, None))), keep=8)


def test_default_layers_scale_with_the_models_depth():
    """The papers' layers (for 32-layer LLMs) are exact on 32 layers and keep their depth fractions
    elsewhere; a model too shallow for the stages is refused naming layers=[...]."""
    from vtprune.scorers.staged import depth_scaled

    assert depth_scaled("transprune", [6, 8, 11], 32) == [6, 8, 11]
    assert depth_scaled("transprune", [6, 8, 11], 40) == [8, 10, 14]  # 13B-sized LLMs
    assert depth_scaled("sparsevlm", [2, 6, 15], 28) == [2, 5, 13]  # Qwen2-VL-7B
    assert depth_scaled("sparsevlm", [2, 6, 15], 4) == [0, 1, 2]  # distinct, each with a layer after it
    assert depth_scaled("transprune", [6, 8, 11], 28, first=7) == [7, 8, 10]  # from the first prunable layer
    with pytest.raises(ConfigError, match="need at least 6 decoder layers, this model has 4"):
        depth_scaled("sparsevlm", [2, 6, 15], 4, first=2)


@pytest.mark.parametrize("method", ["transprune", "sparsevlm", "vflowopt"])
def test_staged_defaults_run_on_a_shallow_model(method):
    model = get_model("llava")  # 4 decoder layers
    inputs = batch(tiny_llava_processor(), [1])
    try:
        vtprune.apply(model, method, keep=8)
        with torch.no_grad():
            model(**inputs)
        st = vtprune.stats(model)
    finally:
        vtprune.remove(model)
    layers = [s["layer"] for s in st.stages if s["layer"] is not None]
    assert layers == ([1, 2] if method == "vflowopt" else [0, 1, 2])
    assert st.visual_after == [8]
