"""ZOO on Qwen-VL: the vision_features signal (the merger MLP's input per merged token) and the projector
the scorer perturbs (the merger MLP) reproduce the visual embeddings; the sensitivities are those of
that projector at those features."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import get_model, qwen_batch

import vtprune
from vtprune.scorers.zoo import ZOOScorer, projector_sensitivity

QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _signals_of_zoo(model, inputs, keep=12, **options):
    """Run zoo once; returns the pre-LLM signals it scored, the bound scorer and the adapter."""
    vtprune.apply(model, "zoo", keep=keep, **options)
    state = model._vtprune_state
    scorer = state.scorer
    seen = {}
    original = ZOOScorer.score

    def spy(self, signals):
        seen["signals"] = signals
        return original(self, signals)

    scorer.score = spy.__get__(scorer)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        del scorer.score
        vtprune.remove(model)
    return seen["signals"], scorer, state.adapter


@pytest.mark.parametrize("kind", QWEN)
def test_vision_features_through_the_merger_give_the_visual_embeddings(kind):
    model = get_model(kind)
    inputs = qwen_batch(kind, "left_padded_2")
    signals, _, adapter = _signals_of_zoo(model, inputs)
    with torch.no_grad():  # the unpatched encoder's outputs, per image (raster order, as the LLM sees them)
        pooled = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    projector = adapter.feature_projector()
    vc = model.config.vision_config
    width = 4 * (vc.embed_dim if kind == "qwen2_vl" else vc.hidden_size)  # 4 patches of the last block
    for b, feats in enumerate(signals.vision_features):
        assert feats.shape == (pooled[b].shape[0], width)
        with torch.no_grad():
            torch.testing.assert_close(projector(feats), pooled[b], atol=0, rtol=0)
    if kind == "qwen3_vl":  # the main merger's MLP, not a deepstack merger's
        assert projector[0] is model.model.visual.merger.linear_fc1
    else:
        assert projector is model.model.visual.merger.mlp


@pytest.mark.parametrize("precision", ["float16", "float32"])
def test_zoo_sensitivity_is_the_merger_mlps_at_the_recorded_features(precision):
    """Window-ordered Qwen2.5-VL: the sensitivity of each token is recomputed from a copy of the merger MLP
    in the chosen precision (float16, the release's, by default) at that token's features, with the same
    direction bank; the two precisions give different values (float16 rounds part of ``h``)."""
    model = get_model("qwen2_5_vl")
    inputs = qwen_batch("qwen2_5_vl", "left_padded_2")
    options = {} if precision == "float16" else {"precision": precision}
    signals, scorer, adapter = _signals_of_zoo(model, inputs, directions=8, **options)
    dtype = getattr(torch, precision)
    feats = signals.vision_features[0]
    bank = torch.nn.functional.normalize(
        torch.randn(8, feats.shape[1], generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        expected = {d: projector_sensitivity(copy.deepcopy(adapter.feature_projector()).to(d), feats.float(), bank,
                                             0.01, dtype=d) for d in (torch.float16, torch.float32)}
    assert scorer.last_sensitivity[0].dtype == dtype
    torch.testing.assert_close(scorer.last_sensitivity[0], expected[dtype], atol=1e-6, rtol=1e-5)
    assert expected[dtype].float().std() > 0  # tokens differ: the ranking means something
    assert not torch.equal(expected[torch.float16].float(), expected[torch.float32])


def test_zoo_on_qwen_records_nothing_for_other_methods():
    """The merger-input hook is installed only for scorers that read vision_features."""
    model = get_model("qwen2_vl")
    inputs = qwen_batch("qwen2_vl", "left_padded_2")
    vtprune.apply(model, "cls", keep=12)
    with torch.no_grad():
        model(**inputs)
    rec = model._vtprune_state.vision_record
    vtprune.remove(model)
    assert "qwen_merger_input" not in rec.extras
