"""Every registered preset on every supported tiny model: keep-all is the identity, and pruning is exact.

In-LLM presets are checked against the drop == mask oracle; pre-LLM presets that only select tokens
against the unpatched language model run on the shortened sequence (what the unpatched model hands its
language model, with the dropped columns removed). Presets that rewrite features (recycling) are
checked for keep-all, counts and generate() here; their own test files check the merged values.
"""

from __future__ import annotations

import pytest
import torch
from conftest import EXITS, batch, budget_for, get_model, qwen_batch
from oracle import dropped_positions, lm_on_kept, masked_logits, staged_masked_logits

import vtprune
from vtprune.adapters import adapter_for
from vtprune.scorers import IN_LLM, PRE_LLM, build_scorer
from vtprune.support import preset_strings

MODELS = ["llava", "next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
OPTIONS = {"ensemble": {"members": ["random", "uniform"]},
           "transprune": {"layers": [0, 1, 2], "ratios": [0.5, 0.25]},  # the tiny models have 4 layers
           "sparsevlm": {"layers": [0, 1, 2], "ratios": [0.5, 0.25], "recycle": False},  # recycling: its own file
           "vflowopt": {"llm_layers": [2], "cell": 8},  # Qwen3-VL's tiny deepstack allows layer 2 only
           # holov's default rewrites the kept slots (the release's order, zero vectors): a pure selection
           # here, its default against the release's sequence in tests/test_holov.py
           "holov": {"order": "raster", "overflow": "drop"},
           "sink": {"dims": [3, 17], "tau": 4.0}}  # tiny models: phi <= sqrt(64) = 8, so tau 20 is out of reach
RECYCLING = {"visionzip", "vflowopt", "prumerge", "prumerge+", "vscan"}  # presets that write merged features into kept slots
OWN_REFERENCE = {"flowcut"}  # presets that hide tokens inside the vision tower: their own test file checks
# them against references that drop those tokens (tests/test_flowcut.py)
LLAVA_FAMILY_ONLY: set[str] = set()  # presets refused on Qwen-VL with a ConfigError (none since zoo, vflowopt)
STAGED = {"transprune", "sparsevlm", "pyramiddrop"}  # prune at the layers of their options, in several stages
KEEP = 12
LLM_LAYER = 2


def host_name(method: str) -> str:
    """The host of a method string; a host name may itself end with '+' (``prumerge+``)."""
    parts = method.split("+")
    return parts[-2] + "+" if parts[-1] == "" else parts[-1]


def method_strings() -> list[str]:
    return preset_strings()


def setup_of(method: str, model) -> tuple[str, int | None]:
    scorer = build_scorer(method, options_for(method, model))
    scorer.bind(model, adapter_for(model))  # a default layer may depend on the model (flowcut)
    if scorer.default_layer is None and PRE_LLM in scorer.stages:
        return PRE_LLM, None
    if method in STAGED:
        return IN_LLM, None  # their own layers (options)
    return IN_LLM, max(scorer.default_layer or LLM_LAYER, LLM_LAYER)


def inputs_for(kind: str, processor, next_processor):
    if kind == "llava":
        return batch(processor, [1, 1])
    if kind == "next":
        return batch(next_processor, [1], sizes=((300, 620),))
    return qwen_batch(kind, "left_padded_2")


def options_for(method: str, model) -> dict:
    if method in STAGED and model.config.model_type == "qwen3_vl":  # deepstack: only layer 2 of 4 qualifies
        return {"layers": [2], "ratios": [], **({"recycle": False} if method == "sparsevlm" else {})}
    return OPTIONS.get(method, {})


def _apply(model, method, keep, layer):
    vtprune.apply(model, method=method, keep=keep, layer=layer, **options_for(method, model))


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("method", method_strings())
def test_preset_keep_all_and_exactness(kind, method, processor, next_processor):
    model = get_model(kind)
    if method in LLAVA_FAMILY_ONLY and kind.startswith("qwen"):
        with pytest.raises(vtprune.ConfigError, match="LLaVA-family models only"):
            _apply(model, method, KEEP, None)
        return
    stage, layer = setup_of(method, model)
    inputs = inputs_for(kind, processor, next_processor)
    with torch.no_grad():
        ref = model(**inputs).logits
        _apply(model, method, 1.0, layer)
        same = model(**inputs).logits
        _apply(model, method, budget_for(method, KEEP), layer)  # an exit refuses a token count
        pruned = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    st = vtprune.stats(model)
    vtprune.remove(model)
    torch.testing.assert_close(same, ref, atol=1e-5, rtol=0)
    assert st.stage == stage and tokens.shape[0] == inputs["input_ids"].shape[0]
    if method in EXITS:
        assert st.visual_after == [0] * len(st.visual_before) and None not in st.exit_layers
    else:
        assert all(0 < a <= b for a, b in zip(st.visual_after, st.visual_before))
        assert any(a < b for a, b in zip(st.visual_after, st.visual_before))
    if host_name(method) in OWN_REFERENCE:
        return
    if stage == IN_LLM and st.stages:
        stages = [(s["layer"], dropped_positions(model, inputs["input_ids"], _as_stats(st, s))) for s in st.stages]
        dropped = stages[-1][1]
        expected = staged_masked_logits(model, inputs, stages)
        check = inputs["attention_mask"].bool() & ~dropped
        torch.testing.assert_close(pruned[check], expected[check], atol=3e-5, rtol=1e-4)
    elif stage == IN_LLM:
        dropped = dropped_positions(model, inputs["input_ids"], st)
        expected = masked_logits(model, inputs, st.layer, dropped)
        check = inputs["attention_mask"].bool() & ~dropped
        torch.testing.assert_close(pruned[check], expected[check], atol=2e-5, rtol=1e-4)
    elif host_name(method) not in RECYCLING:
        expected, valid = lm_on_kept(model, inputs, st)
        assert pruned.shape[1] == expected.shape[1]
        torch.testing.assert_close(pruned[valid], expected[valid], atol=2e-5, rtol=1e-4)


def _as_stats(st, stage):
    """``st`` with one stage's kept sets, for `dropped_positions`."""
    import dataclasses

    return dataclasses.replace(st, kept=stage["kept"])
