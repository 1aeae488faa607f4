"""Host syncs and dispatched ops vtprune adds: deterministic counts (wall times are for benchmarks).

Counted on the CPU with device provenance (`vtprune.eval.opcount`): the model's parameters and inputs
stand for accelerator memory, and every read of such a tensor on the host (``.item()``, ``bool(t)``,
``nonzero``, ``.cpu()``, ``.tolist()``, boolean-mask indexing) is a sync that a GPU would pay.
"""

from __future__ import annotations

import pytest
import torch
from conftest import batch, budget_for, get_model, qwen_batch
from test_presets import OPTIONS, method_strings

import vtprune
from vtprune.eval.opcount import count_prefill_decode
from vtprune.toy.tiny import tiny_llava, tiny_llava_processor

# the prefill targets: at most 2 host syncs, the same at batch 1 and with a padded batch
HOT = ["fastv", "cls", "visionzip", "divprune", "cdpruner", "vispruner"]


def _inputs(kind: str, n: int):
    if kind.startswith("qwen"):
        return dict(qwen_batch(kind, "single" if n == 1 else "left_padded_2"))
    return dict(batch(tiny_llava_processor(next_=kind == "next"), [1] * n))


def _counts(model, kind: str, method: str, n: int, **opts):
    vtprune.remove(model)
    vtprune.apply(model, method=method, keep=budget_for(method, 8), **opts)
    try:
        return count_prefill_decode(model, _inputs(kind, n), decode_steps=2)
    finally:
        vtprune.remove(model)


@pytest.mark.parametrize("kind", ["llava", "next", "qwen2_vl"])
@pytest.mark.parametrize("method", HOT)
def test_prefill_syncs_are_few_and_independent_of_batch_size(kind, method):
    model = get_model(kind)
    one = _counts(model, kind, method, 1)
    many = _counts(model, kind, method, 3 if not kind.startswith("qwen") else 2)
    for pd in (one, many):
        assert pd.prefill.vtprune_syncs <= 2, pd.prefill.format_sites()
        assert all(step.vtprune_syncs == 0 for step in pd.decode), pd.decode_total.format_sites()
    assert many.prefill.vtprune_syncs == one.prefill.vtprune_syncs, (one.prefill.format_sites(),
                                                                     many.prefill.format_sites())


@pytest.mark.parametrize("method", method_strings())
def test_decode_adds_no_host_sync_for_any_preset(method):
    """Every preset, a padded batch of 2 (ragged masks in decode): zero syncs per decode step."""
    model = get_model("llava")
    opts = dict(OPTIONS.get(method, {}))
    if method == "sink":
        opts["layer"] = 2
    pd = _counts(model, "llava", method, 2, **opts)
    assert len(pd.decode) == 2
    assert all(step.vtprune_syncs == 0 for step in pd.decode), pd.decode_total.format_sites()


def test_flowcut_decode_has_no_sync_on_qwen():
    model = get_model("qwen2_vl")
    pd = _counts(model, "qwen2_vl", "flowcut", 2)
    assert all(step.vtprune_syncs == 0 for step in pd.decode), pd.decode_total.format_sites()


@pytest.mark.parametrize("method", ["fastv", "cls"])
def test_decode_ops_do_not_grow_with_depth(method):
    """Per decode step vtprune adds one mask gather per pruned stage, whatever the number of layers."""
    counts = []
    for layers in (4, 8):
        model = tiny_llava(layers=layers)
        pd = _counts(model, "llava", method, 2, **({"layer": 1} if method == "fastv" else {}))
        counts.append([step.vtprune_ops for step in pd.decode])
    assert counts[0] == counts[1]
    assert counts[0][0] == counts[0][1]  # constant per step


def test_stats_are_built_on_first_access_not_in_the_prefill():
    model = get_model("llava")
    vtprune.apply(model, method="fastv", keep=8)
    with torch.no_grad():
        model(**_inputs("llava", 2))
    state = model._vtprune_state
    assert callable(state._stats)  # nothing built yet
    st = vtprune.stats(model)
    assert st.visual_after == [8, 8] and not callable(state._stats)
    vtprune.remove(model)
