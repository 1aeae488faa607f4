"""TransPrune: its two signals against independent computations, its score on a constructed case, its
stage plan. Exactness (staged drop == staged masking) on every tiny model is in tests/test_presets.py."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, get_model

import vtprune
from vtprune.config import ConfigError
from vtprune.layout import VisualLayout
from vtprune.scorers import TransPrune
from vtprune.scorers.base import Signals
from vtprune.scorers.select import StageBudget, select_topk
from vtprune.scorers.staged import staged_plan
from vtprune.scorers.transprune import transition_variation


def test_transition_variation_formula():
    x_in = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]]])
    x_out = torch.tensor([[[2.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]])  # same direction, reversed, same
    valid = torch.tensor([[True, True, False]])
    tau = transition_variation(x_in, x_out, valid)
    w = torch.softmax(torch.tensor([0.0, 2.0]), 0)  # 1 - cos: 0 and 2; the padding token is left out
    torch.testing.assert_close(tau[0], torch.tensor([2.0 * w[0], 1.0 * w[1], 0.0]))


def test_score_adds_the_normalised_parts_per_image():
    n = 4
    lay = VisualLayout([torch.arange(n)], [torch.tensor([0, 0, 1, 1])], [torch.ones(n, dtype=torch.bool)],
                       [torch.arange(n)], [torch.zeros(n, 3, dtype=torch.long)], seq_len=n)
    sig = Signals(layout=lay, stage="llm", keep=1, extras={"ttv": [torch.tensor([1.0, 3.0, 5.0, 5.0])],
                                                           "iga": [torch.tensor([0.5, 0.5, 0.1, 0.3])]})
    s = TransPrune().score(sig)[0]
    torch.testing.assert_close(s, torch.tensor([0.25 + 0.5, 0.75 + 0.5, 0.5 + 0.25, 0.5 + 0.75]))
    assert select_topk([s], lay, 1)[0].tolist() == [1, 3]


def test_stage_plan():
    plan = staged_plan([6, 8, 11], [0.875, 0.625], 64)
    assert plan == [(6, StageBudget(0.875, 64)), (8, StageBudget(0.625 / 0.875, 64)), (11, 64)]
    plan = staged_plan([6, 8, 11], [0.875, 0.625], 1.0)  # keep-all prunes at no stage
    assert [b.fraction for _, b in plan[:2]] == [1.0, 1.0] and plan[2] == (11, 1.0)
    plan = staged_plan([6, 8, 11], [0.875, 0.625], 0.25)
    assert plan[2][1] == pytest.approx(0.4)  # 0.25 of the original = 0.4 of the 0.625 still present


def test_signals_match_independent_computations(processor):
    """Stage 0 (after layer 1): IGA = layer 2's eager attention of the instruction rows, head- and row-mean;
    TTV = the formula on layer 1's attention and MLP sublayers, from hooks on the unpatched model."""
    model = get_model("llava", "eager")
    inputs = batch(processor, [1])
    vtprune.apply(model, "transprune", keep=16, layers=[1, 2], ratios=[0.5])
    with torch.no_grad():
        model(**inputs)
    scorer = model._vtprune_state.scorer
    with torch.no_grad():
        model(**inputs)  # a second prefill replaces the record (one entry per stage), it does not grow it
    assert len(scorer.last_parts) == 2
    parts = scorer.last_parts[0]
    vtprune.remove(model)
    layers = model.model.language_model.layers
    seen = {}

    def grab(name):
        def hook(module, args, kwargs, output):
            seen[name] = (args[0] if args else kwargs["hidden_states"], output[0] if isinstance(output, tuple) else output)
        return hook

    handles = [layers[1].self_attn.register_forward_hook(grab("attn"), with_kwargs=True),
               layers[1].mlp.register_forward_hook(grab("mlp"), with_kwargs=True)]
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    for h in handles:
        h.remove()
    ids = inputs["input_ids"][0]
    visual = torch.nonzero(ids == model.config.image_token_id).flatten()
    rows = torch.arange(int(visual.max()) + 1, ids.shape[0])
    iga = out.attentions[2][0][:, rows].float().mean(dim=(0, 1))[visual]
    torch.testing.assert_close(parts["iga"][0], iga, atol=1e-6, rtol=1e-4)

    def tau(x_in, x_out):
        a, b = x_in[0].float(), x_out[0].float()
        w = torch.softmax(1 - torch.nn.functional.cosine_similarity(a, b, dim=-1), 0)
        return b.norm(dim=-1) / a.norm(dim=-1) * w

    ttv = (tau(*seen["attn"]) + tau(*seen["mlp"]))[visual]
    torch.testing.assert_close(parts["ttv"][0], ttv, atol=1e-7, rtol=1e-4)


def test_staged_counts_and_generate(processor):
    model = get_model("llava")
    inputs = batch(processor, [2, 1], padding_side="left")
    vtprune.apply(model, "transprune", keep=20, layers=[0, 1, 2], ratios=[0.5, 0.25])
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert [s["visual_after"] for s in st.stages] == [[576, 288], [288, 144], [40, 20]]
    assert tokens.shape[0] == 2 and "in stages: after LLM layer 0, after LLM layer 1, after LLM layer 2" in st.summary()


def test_options_and_layers_are_checked(llava):
    with pytest.raises(ConfigError, match="need at least 13 decoder layers, this model has 4"):
        vtprune.apply(llava, "transprune", keep=8, layers=[6, 8, 11], ratios=[0.875, 0.625])
    with pytest.raises(ConfigError, match="one ratio per stage before the last"):
        vtprune.apply(llava, "transprune", keep=8, layers=[0, 2], ratios=[0.5, 0.3])
    with pytest.raises(ConfigError, match="decreasing fractions"):
        vtprune.apply(llava, "transprune", keep=8, layers=[0, 1, 2], ratios=[0.3, 0.5])
    with pytest.raises(ConfigError, match="instead of layer=1"):
        vtprune.apply(llava, "transprune", keep=8, layer=1, layers=[0, 2], ratios=[0.5])
