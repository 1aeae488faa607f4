"""LLaVA-NeXT specifics: per-image budget across tiles, newline tokens never pruned, several images."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, get_model
from oracle import dropped_positions, masked_logits

import vtprune


def newline_indices(model, inputs, b: int) -> torch.Tensor:
    """Indices (into sample b's visual tokens) whose embedding is the image-newline parameter."""
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], return_dict=True
        ).pooler_output
    flat = torch.cat(list(feats))
    is_nl = (flat == model.model.image_newline).all(-1)
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    start = sum(counts[:b])
    return torch.nonzero(is_nl[start:start + counts[b]]).flatten()


@pytest.mark.parametrize("method,layer", [("cls", None), ("uniform", None), ("fastv", 1)])
def test_newlines_kept_and_budget_per_image(method, layer, next_processor):
    model = get_model("next")
    inputs = batch(next_processor, [2], sizes=((400, 500), (300, 620)))
    vtprune.apply(model, method=method, keep=50, layer=layer)
    with torch.no_grad():
        model(**inputs)
    st = vtprune.stats(model)
    vtprune.remove(model)
    nl = newline_indices(model, inputs, 0)
    assert nl.numel() > 0
    assert torch.isin(nl, st.kept[0]).all(), "image-newline tokens must never be pruned"
    # two images, 50 prunable tokens each, plus every newline
    assert st.visual_after[0] == 2 * 50 + nl.numel()


def test_fraction_budget_counts_prunable_tokens_only(next_processor):
    model = get_model("next")
    inputs = batch(next_processor, [1])
    vtprune.apply(model, method="random", keep=0.1)
    with torch.no_grad():
        model(**inputs)
    st = vtprune.stats(model)
    vtprune.remove(model)
    nl = newline_indices(model, inputs, 0).numel()
    prunable = st.visual_before[0] - nl
    assert st.visual_after[0] == round(0.1 * prunable) + nl


def test_cls_scores_follow_the_packed_layout(next_processor):
    """The CLS score of every kept token is at least that of every dropped prunable token of its image."""
    model = get_model("next")
    inputs = batch(next_processor, [1])
    vtprune.apply(model, method="cls", keep=0.5)
    state = model._vtprune_state
    with torch.no_grad():
        model(**inputs)
    st = vtprune.stats(model)
    rows = state.vision_record.cls_attention.flatten()
    vtprune.remove(model)
    # tile 0 is the base image: its 576 patches come first in the packed sequence, in raster order,
    # and their scores are CLS-row columns 1..576 of tile 0
    base_scores = rows[torch.arange(576) + 1]
    kept_base = st.kept[0][st.kept[0] < 576]
    dropped_base = torch.tensor(sorted(set(range(576)) - set(kept_base.tolist())))
    assert kept_base.numel() > 0 and dropped_base.numel() > 0
    # one top-k over the whole image: a kept base token scores at least as high as any dropped one
    assert base_scores[kept_base].min() >= base_scores[dropped_base].max()


def test_multi_image_in_llm_matches_masking(next_processor):
    model = get_model("next")
    inputs = batch(next_processor, [2, 1], sizes=((400, 500), (300, 620), (500, 300)))
    vtprune.apply(model, method="fastv", keep=20, layer=1)
    with torch.no_grad():
        pruned = model(**inputs).logits
    st = vtprune.stats(model)
    vtprune.remove(model)
    dropped = dropped_positions(model, inputs["input_ids"], st)
    ref = masked_logits(model, inputs, 1, dropped)
    check = inputs["attention_mask"].bool() & ~dropped
    torch.testing.assert_close(pruned[check], ref[check], atol=2e-5, rtol=1e-4)
