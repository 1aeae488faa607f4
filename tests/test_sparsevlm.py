"""SparseVLM: raters on a constructed case and on a model, the rater attention against eager attention.
Exactness (staged drop == staged masking) on every tiny model is in tests/test_presets.py."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, get_model

import vtprune
from vtprune.config import ConfigError
from vtprune.scorers.sparsevlm import select_raters


def test_raters_are_the_text_tokens_the_image_attends_to():
    visual = torch.tensor([[4.0, 0.0], [5.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.0], [0.0, -1.0]])  # tokens 0 and 2 align with the image
    assert select_raters(visual, text).tolist() == [True, False, True, False]
    assert select_raters(visual, torch.zeros(3, 2)).tolist() == [True, True, True]  # all equal: everyone rates


def test_scores_are_layer_attention_of_the_raters(processor):
    model = get_model("llava", "eager")
    inputs = batch(processor, [1])
    vtprune.apply(model, "sparsevlm", keep=16, layers=[1, 2], ratios=[0.5])
    with torch.no_grad():
        model(**inputs)
    st = vtprune.stats(model)
    scorer = model._vtprune_state.scorer
    raters = scorer.last_raters[0]
    vtprune.remove(model)
    seen = {}
    h = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.update(x=a[0] if a else k["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    h.remove()
    ids = inputs["input_ids"][0]
    visual = torch.nonzero(ids == model.config.image_token_id).flatten()
    text = torch.arange(int(visual.max()) + 1, ids.shape[0])
    x = seen["x"][0]
    expected_raters = text[select_raters(x[visual], x[text])]
    assert torch.equal(raters, expected_raters) and 0 < raters.numel() < text.numel()
    # stage 0 at layer 1: its kept tokens are the top half by the raters' mean head-mean attention
    att = out.attentions[1][0][:, raters].float().mean(dim=(0, 1))[visual]
    want = torch.sort(torch.topk(att, 288).indices).values
    assert torch.equal(st.stages[0]["kept"][0], want)


def test_layers_are_checked(llava):
    with pytest.raises(ConfigError, match="need at least 17 decoder layers, this model has 4"):
        vtprune.apply(llava, "sparsevlm", keep=8)
