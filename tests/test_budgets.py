"""Budgets: no preset keeps more visual tokens per image than its budget, and its stats agree with themselves.

Recycled and contextual tokens (VisionZip's contextual tokens, VFlowOpt's recycled cells, SparseVLM's
cluster centers) count inside the budget; ``contextual <= kept``; ``kept``, ``per_image``,
``visual_after``, ``seq_len_after``, the last stage of ``stages`` and ``summary()`` describe the same tokens.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import EXITS, batch, get_model
from test_presets import method_strings, options_for, setup_of

import vtprune

KEEPS = [1, 2, 3, 8]
IMAGES = [1, 2]  # images per sample of the test batch (LLaVA-1.5: 576 tokens each, no never-pruned ones)


def check_stats(st: vtprune.PruneStats, keep: int, n_images: list[int]) -> None:
    """Every invariant a fixed integer budget ``keep`` (per image) implies for `PruneStats` ``st``."""
    assert len(st.kept) == len(st.visual_after) == len(st.visual_before) == len(n_images)
    for b, n in enumerate(n_images):
        kept, after, before = st.kept[b], st.visual_after[b], st.visual_before[b]
        assert kept.numel() == after, f"sample {b}: {kept.numel()} kept indices, visual_after {after}"
        if after:
            assert bool((kept[1:] > kept[:-1]).all()) and 0 <= int(kept[0]) and int(kept[-1]) < before
        assert after <= keep * n, f"sample {b}: kept {after} > budget {keep} x {n} images"
        assert len(st.per_image[b]) == n and sum(st.per_image[b]) == after, (st.per_image[b], after)
        assert all(0 < c <= keep for c in st.per_image[b]), f"sample {b}: per image {st.per_image[b]} > {keep}"
        assert st.seq_len_before[b] - st.seq_len_after[b] == before - after, (
            f"sample {b}: sequence {st.seq_len_before[b]} -> {st.seq_len_after[b]}, visual {before} -> {after}")
        if st.contextual is not None:
            assert 0 <= st.contextual[b] <= after, f"sample {b}: {st.contextual[b]} contextual of {after} kept"
    if st.stages:
        last = st.stages[-1]
        assert last["visual_after"] == st.visual_after
        assert all(torch.equal(x, y) for x, y in zip(last["kept"], st.kept))
        for earlier, later in zip(st.stages, st.stages[1:]):  # each stage selects among the earlier one's
            for b in range(len(n_images)):
                assert bool(torch.isin(later["kept"][b], earlier["kept"][b]).all())
    text = st.summary()
    assert "kept " + ", ".join(f"{a}/{b}" for a, b in zip(st.visual_after, st.visual_before)) + " visual" in text
    if st.contextual:
        assert f"of which {', '.join(map(str, st.contextual))} contextual" in text
    else:
        assert "contextual" not in text


@pytest.fixture(scope="module")
def inputs(processor):
    return batch(processor, IMAGES)


@pytest.mark.parametrize("method", [m for m in method_strings() if m not in EXITS])  # exits: test_dyvte.py
def test_every_preset_keeps_at_most_its_budget(method, inputs):
    model = get_model("llava")
    _, layer = setup_of(method, model)
    try:
        for keep in KEEPS:
            vtprune.apply(model, method=method, keep=keep, layer=layer, **options_for(method, model))
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("error")  # no budget is clamped here
                model(**inputs)
            check_stats(vtprune.stats(model), keep, IMAGES)
    finally:
        vtprune.remove(model)


@pytest.mark.parametrize("options", [{"recycle": True}, {"recycle": True, "recycle_fraction": 1.0}],
                         ids=["recycle", "recycle-all"])
def test_sparsevlm_recycled_centers_count_in_the_budget(options, inputs):
    model = get_model("llava")
    try:
        for keep in KEEPS:
            vtprune.apply(model, method="sparsevlm", keep=keep, layers=[0, 1, 2], ratios=[0.5, 0.25], **options)
            with torch.no_grad():
                model(**inputs)
            check_stats(vtprune.stats(model), keep, IMAGES)
    finally:
        vtprune.remove(model)


@pytest.mark.parametrize("cell,cells", [(15.58, 4), (8.0, 9), (4.0, 36)])  # grid cells of the 24 x 24 patches
def test_vflowopt_pre_llm_only_recycles_within_the_budget(cell, cells, inputs):
    """``llm_layers=[]``: the pre-LLM stage alone must hold the budget, its recycled cells included (with 4
    cells and ``keep=1`` it used to keep the top token plus one recycled token per cell, 5 of 1)."""
    model = get_model("llava")
    try:
        for keep in KEEPS:
            vtprune.apply(model, method="vflowopt", keep=keep, llm_layers=[], cell=cell)
            with torch.no_grad():
                model(**inputs)
            st = vtprune.stats(model)
            check_stats(st, keep, IMAGES)
            assert st.visual_after == [keep * n for n in IMAGES]  # every cell of the image has removed members
            # one recycled token per cell while the budget holds them and one important token
            assert st.contextual == [min(keep - 1, cells) * n for n in IMAGES]
    finally:
        vtprune.remove(model)


def test_vflowopt_contextual_counts_the_recycled_tokens_that_survive_the_llm_stages(inputs):
    """After the LLM stages, ``contextual`` counts the recycled tokens among the final kept ones."""
    model = get_model("llava")
    try:
        vtprune.apply(model, method="vflowopt", keep=3, llm_layers=[1, 2], cell=8, vision_ratio=0.3)
        with torch.no_grad():
            model(**inputs)
        st = vtprune.stats(model)
        check_stats(st, 3, IMAGES)
        pre = st.stages[0]
        assert pre["layer"] is None and all(a > 3 * n for a, n in zip(pre["visual_after"], IMAGES))
        recycled = model._vtprune_state.scorer.last_recycled  # per sample the recycled slots (visual indices)
        assert [int(r.numel()) for r in recycled] == [9 * n for n in IMAGES]  # one per cell of 8 x 8 patches
        assert st.contextual == [int(torch.isin(k, r.cpu()).sum()) for k, r in zip(st.kept, recycled)]
    finally:
        vtprune.remove(model)
