"""Cacheless continuations (`vtprune.runtime.continuation`): ``generate(use_cache=False)`` and a forward of
prompt + answer without a cache keep the prompt's plan, so they answer as the cached run does."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, budget_for, get_model, qwen_batch
from test_presets import method_strings, options_for, setup_of

import vtprune
from vtprune.toy.tiny import tiny_llava_processor

KEEP = 12


def _apply(model, method: str, **extra) -> None:
    stage, layer = setup_of(method, model)
    options = {**options_for(method, model), **extra}
    vtprune.apply(model, method=method, keep=budget_for(method, KEEP), layer=layer if stage == "llm" else None,
                  **options)


def _kept(model) -> list[list[int]]:
    return [k.tolist() for k in vtprune.stats(model).kept]


def _both_ways(model, inputs) -> None:
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True)
        st_cached = vtprune.stats(model)
        kept_cached = _kept(model)
        cacheless = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, cacheless)
    st = vtprune.stats(model)
    assert _kept(model) == kept_cached  # the prompt's selection, not the last step's
    assert st.seq_len_before == st_cached.seq_len_before  # the stats describe the prompt


@pytest.mark.parametrize("method", method_strings())
def test_use_cache_false_answers_as_the_cached_run_llava(method):
    model = get_model("llava")
    try:
        _apply(model, method)
        # left-padded, rows of two lengths with 2 and 1 images: ragged after pruning (re-padded rows)
        _both_ways(model, batch(tiny_llava_processor(), [2, 1]))
    finally:
        vtprune.remove(model)


CASES = [("llava", "sparsevlm", {"recycle": True}), ("next", "fastv", {}), ("next", "cdpruner", {}),
         ("qwen2_vl", "fastv", {}), ("qwen2_vl", "cls", {}), ("qwen2_vl", "transprune", {}),
         ("qwen2_vl-right", "fastv", {})]


@pytest.mark.parametrize("kind,method,extra", CASES, ids=[f"{k}-{m}" for k, m, _ in CASES])
def test_use_cache_false_answers_as_the_cached_run_other_models(kind, method, extra):
    side = "right" if kind.endswith("-right") else "left"
    kind = kind.removesuffix("-right")
    model = get_model(kind)
    if kind.startswith("qwen"):
        inputs = qwen_batch(kind, "left_padded_2", padding_side=side)  # images of two sizes
    else:
        inputs = batch(tiny_llava_processor(next_=kind == "next"), [1, 1])
    try:
        _apply(model, method, **extra)
        _both_ways(model, inputs)
    finally:
        vtprune.remove(model)


def test_forward_of_prompt_plus_answer_scores_the_answer_under_the_prompts_plan():
    """Log-likelihood scoring without a cache: the answer's logits equal those of cached decoding."""
    model = get_model("llava")
    x = batch(tiny_llava_processor(), [1, 1])
    answer = torch.tensor([[11, 12, 13]] * 2)
    try:
        vtprune.apply(model, method="fastv", keep=8, layer=1)
        with torch.no_grad():
            out = model(**x, use_cache=True)
            kept = _kept(model)
            steps, cache, mask = [], out.past_key_values, x["attention_mask"]
            for t in range(answer.shape[1]):
                mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
                step = model(input_ids=answer[:, t:t + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
                steps.append(step.logits[:, -1])
                cache = step.past_key_values
            model(**x, use_cache=False)  # the prompt, without a cache
            full = {**x, "input_ids": torch.cat([x["input_ids"], answer], 1), "attention_mask": mask}
            whole = model(**full, use_cache=False)
        assert _kept(model) == kept
        n = x["input_ids"].shape[1]
        got = whole.logits[:, n:n + answer.shape[1] - 1]
        torch.testing.assert_close(got, torch.stack(steps[:-1], 1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(whole.logits[:, n - 1], out.logits[:, -1], atol=1e-4, rtol=1e-4)
    finally:
        vtprune.remove(model)


def test_a_different_prompt_is_selected_anew():
    model = get_model("llava")
    proc = tiny_llava_processor()
    x = batch(proc, [1, 1])
    try:
        vtprune.apply(model, method="fastv", keep=8, layer=1)
        with torch.no_grad():
            model(**x, use_cache=False)
            first = vtprune.stats(model).seq_len_before
            changed = dict(x, input_ids=torch.cat([x["input_ids"][:, :-1], x["input_ids"][:, -2:]], 1),
                           attention_mask=torch.cat([x["attention_mask"], x["attention_mask"][:, -1:]], 1))
            model(**changed, use_cache=False)  # not an extension: its last prompt token was replaced
        assert vtprune.stats(model).seq_len_before == [n + 1 for n in first]
    finally:
        vtprune.remove(model)
