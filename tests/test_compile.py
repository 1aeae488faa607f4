"""The decode step of a pruned model compiles: vtprune's decode hooks add no graph break.

Checked on the CPU with dynamo only (``backend="eager"``: no code generation): `torch._dynamo.explain`
counts the graph breaks of one decode step, and ``fullgraph=True`` compiles three steps whose logits must
equal the eager ones.
"""

from __future__ import annotations

import pytest
import torch
from conftest import batch, get_model

import vtprune

CASES = [("cls", "static"), ("cls", "dynamic"), ("random", "static"), ("fastv", "dynamic")]


def _prefill(model, inputs, cache_kind: str):
    from transformers import DynamicCache, StaticCache

    cache = StaticCache(config=model.config, max_cache_len=700) if cache_kind == "static" else DynamicCache()
    out = model(**inputs, past_key_values=cache, use_cache=True)
    return cache, out.logits[:, -1:].argmax(-1)


def _decode(fn, inputs, cache, ids, steps: int):
    bsz = ids.shape[0]
    mask = inputs["attention_mask"]
    logits = []
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones(bsz, 1, dtype=mask.dtype)], dim=1)
        out = fn(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        ids = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits)


def _graph_breaks(model, inputs, cache_kind: str) -> int:
    with torch.no_grad():
        cache, ids = _prefill(model, inputs, cache_kind)
        mask = torch.cat([inputs["attention_mask"], torch.ones(ids.shape[0], 1, dtype=torch.long)], dim=1)
        torch._dynamo.reset()
        ex = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return ex.graph_break_count


@pytest.mark.parametrize("method,cache_kind", CASES)
def test_decode_step_adds_no_graph_break(processor, method, cache_kind):
    model = get_model("llava")
    inputs = batch(processor, [1, 1], padding_side="left")
    plain = _graph_breaks(model, inputs, cache_kind)
    vtprune.apply(model, method=method, keep=8, **({"layer": 1} if method == "fastv" else {}))
    try:
        assert _graph_breaks(model, inputs, cache_kind) == plain
    finally:
        vtprune.remove(model)


@pytest.mark.parametrize("method,cache_kind", CASES)
def test_compiled_decode_matches_eager(processor, method, cache_kind):
    model = get_model("llava")
    inputs = batch(processor, [1, 1], padding_side="left")
    vtprune.apply(model, method=method, keep=8, **({"layer": 1} if method == "fastv" else {}))
    try:
        with torch.no_grad():
            cache, ids = _prefill(model, inputs, cache_kind)
            eager = _decode(model, inputs, cache, ids, 3)
            cache, ids = _prefill(model, inputs, cache_kind)
            torch._dynamo.reset()
            compiled = _decode(torch.compile(model, fullgraph=True, backend="eager"), inputs, cache, ids, 3)
    finally:
        torch._dynamo.reset()
        vtprune.remove(model)
    assert torch.equal(compiled, eager)
