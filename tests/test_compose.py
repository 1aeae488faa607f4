"""Composition: method strings with '+', option routing, Python scorer objects, ensembles."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, get_model, qwen_batch
from oracle import dropped_positions, masked_logits

import vtprune
from vtprune.config import ConfigError, PruneConfig
from vtprune.layout import VisualLayout
from vtprune.scorers import Ensemble, Scorer, Signals, Wrapper, build_scorer, method_string
from vtprune.scorers.baselines import RandomScorer
from vtprune.scorers.fastv import FastVScorer
from vtprune.scorers.select import select_topk


class Fixed(Scorer):
    """A test scorer returning given scores (not registered)."""

    name = "fixed"
    description = "test"

    def __init__(self, values: list[float]) -> None:
        self.values = torch.tensor(values)

    def score(self, signals):
        return [self.values.clone()]


class Negate(Wrapper):
    name = "negate"
    description = "test wrapper"

    def transform(self, scores, signals):
        return [-s for s in scores]


def one_image_layout(n: int) -> VisualLayout:
    return VisualLayout(
        positions=[torch.arange(n)], image=[torch.zeros(n, dtype=torch.long)],
        prunable=[torch.ones(n, dtype=torch.bool)], source=[torch.arange(n)],
        coords=[torch.zeros(n, 3, dtype=torch.long)], seq_len=n,
    )


def test_wrapper_transforms_and_passes_host_properties():
    w = Negate(FastVScorer())
    assert w.default_layer == 2 and w.stages == FastVScorer.stages
    assert w.needs_signal("llm_attention")
    sig = Signals(layout=one_image_layout(4), stage="llm", keep=2)
    out = Negate(Fixed([0.1, 0.4, 0.2, 0.3])).score(sig)
    assert torch.equal(select_topk(out, sig.layout, 2)[0], torch.tensor([0, 2]))


def test_minus_inf_excludes_and_shrinks_the_budget():
    sig = Signals(layout=one_image_layout(5), stage="pre-llm", keep=4)
    scores = [torch.tensor([0.5, float("-inf"), 0.1, float("-inf"), 0.9])]
    assert select_topk(scores, sig.layout, 4)[0].tolist() == [0, 2, 4]


@pytest.mark.parametrize("mode,weights,want", [
    ("score", [1.0, 1.0], [0, 3]),
    ("rank", [1.0, 0.0], [2, 3]),
    ("rank", [0.0, 1.0], [0, 1]),
])
def test_ensemble_combines_normalised_members(mode, weights, want):
    a = Fixed([0.0, 1.0, 9.0, 10.0])  # min-max: 0, .1, .9, 1
    b = Fixed([1.0, 0.9, 0.0, 0.5])  # min-max: 1, .9, 0, .5
    ens = Ensemble([a, b], weights=weights, mode=mode)
    sig = Signals(layout=one_image_layout(4), stage="pre-llm", keep=2)
    assert select_topk(ens.score(sig), sig.layout, 2)[0].tolist() == want


def test_ensemble_errors_name_the_fix():
    with pytest.raises(ConfigError, match="needs members"):
        Ensemble([])
    with pytest.raises(ConfigError, match="weights"):
        Ensemble(["random", "uniform"], weights=[1.0])
    with pytest.raises(ConfigError, match="mode"):
        Ensemble(["random"], mode="mean")
    with pytest.raises(ConfigError, match="different stages"):
        Ensemble(["fastv", "cls"])


@pytest.mark.parametrize("method,match", [
    ("nope+fastv", "unknown method 'nope'"),
    ("fastv+cls", "not a wrapper"),
    ("fastv++cls", "empty component"),
    ("random+random", "not a wrapper"),
])
def test_bad_method_strings(method, match):
    with pytest.raises(ConfigError, match=match):
        build_scorer(method, {})


def test_option_routing():
    s = build_scorer("ensemble", {"members": ["random", "uniform"], "weights": [2, 1]})
    assert isinstance(s, Ensemble) and s.weights == [2.0, 1.0]
    with pytest.raises(ConfigError, match="no option 'seeed'"):
        build_scorer("random", {"seeed": 1})
    with pytest.raises(ConfigError, match="is not part of"):
        build_scorer("random", {"cls.vision_layer": -2})
    assert build_scorer("random", {"random.seed": 5}).seed == 5


def test_scorer_object_round_trips_through_the_config():
    model = get_model("llava")
    scorer = Ensemble([FastVScorer(), RandomScorer(seed=3)], weights=[1.0, 0.5], mode="score")
    vtprune.apply(model, scorer, keep=16)
    cfg = vtprune.config_of(model)
    assert cfg.method == "ensemble" and cfg.options["ensemble.members"] == ["fastv", "random"]
    assert method_string(scorer) == "ensemble"
    with pytest.raises(ConfigError, match="carries its own"):
        vtprune.apply(model, scorer, method="fastv")
    vtprune.remove(model)
    rebuilt = build_scorer(cfg.method, cfg.options)
    assert rebuilt.weights == [1.0, 0.5] and rebuilt.mode == "score"
    # seeds of object members are not part of the string form: the default seed is used
    assert isinstance(rebuilt.members[1], RandomScorer)
    PruneConfig.from_json(cfg.to_json())


def test_ensemble_in_llm_drop_equals_masking(processor):
    model = get_model("llava")
    inputs = batch(processor, [1, 1])
    vtprune.apply(model, method="ensemble", keep=24, layer=1, members=["fastv", "random"], weights=[1.0, 0.3])
    with torch.no_grad():
        pruned = model(**inputs).logits
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert st.stage == "llm" and st.visual_after == [24, 24]
    dropped = dropped_positions(model, inputs["input_ids"], st)
    ref = masked_logits(model, inputs, 1, dropped)
    check = inputs["attention_mask"].bool() & ~dropped
    torch.testing.assert_close(pruned[check], ref[check], atol=2e-5, rtol=1e-4)


def test_ensemble_pre_llm_on_qwen():
    model = get_model("qwen2_vl")
    inputs = qwen_batch("qwen2_vl", "left_padded_2")
    vtprune.apply(model, method="ensemble", keep=10, members=["cls", "uniform"])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    st = vtprune.stats(model)
    vtprune.remove(model)
    assert st.stage == "pre-llm" and st.visual_after == [10, 10] and out.shape[0] == 2


def test_short_names_compose_like_strings(processor):
    from vtprune.scorers import Debias, FastV, Sink

    model = get_model("llava")
    inputs = batch(processor, [1])
    obj = Debias(Sink(FastV(), dims=[3, 17], tau=4.0))
    vtprune.apply(model, obj, keep=20, layer=2)
    cfg = vtprune.config_of(model)
    with torch.no_grad():
        a = model(**inputs).logits
    kept_a = vtprune.stats(model).kept[0]
    assert cfg.method == "debias+sink+fastv"
    vtprune.apply(model, cfg)  # the same setup from its config
    with torch.no_grad():
        b = model(**inputs).logits
    kept_b = vtprune.stats(model).kept[0]
    vtprune.remove(model)
    assert torch.equal(kept_a, kept_b) and torch.equal(a, b)


@pytest.mark.parametrize("host", ["pyramiddrop", "vscan", "vflowopt"])
def test_a_wrapper_keeps_every_stage_its_host_plans(host):
    """debias over a staged or two-stage host prunes at the same stages with the same budgets as the
    host alone (a wrapper corrects scores; it never drops the host's later stages)."""
    model = get_model("llava")
    plans = {}
    for method in (host, f"debias+{host}"):
        vtprune.apply(model, method=method, keep=8, **({"trend": [0.1, 0.0, 0.0]} if method.startswith("debias") else {}))
        st = model._vtprune_state
        plans[method] = (st.stage, st.layer, st.pre_keep, list(st.schedule))
        vtprune.remove(model)
    assert plans[f"debias+{host}"] == plans[host]
    assert plans[host][3], f"{host} plans LLM stages"


@pytest.mark.parametrize("member", ["vscan", "vflowopt", "pyramiddrop", "dart", "holov", "debias+pyramiddrop"])
def test_an_ensemble_refuses_members_that_plan_their_own_stages(member):
    with pytest.raises(ConfigError, match="plans its own stages or selection.*run it alone"):
        build_scorer("ensemble", {"members": [member, "cls" if member in ("vscan", "vflowopt", "holov") else "fastv"]})
