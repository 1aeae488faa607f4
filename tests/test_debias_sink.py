"""debias (positional trend + padding sinks), sink (massive activations) and `vtprune calibrate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import batch, get_model, make_image, qwen_batch
from oracle import dropped_positions, masked_logits
from PIL import Image

import vtprune
from vtprune.calibrate import calibrate, fit_trend
from vtprune.calibration import CalibrationError, calibration_key, save_calibration
from vtprune.cli import main
from vtprune.config import ConfigError
from vtprune.layout import VisualLayout
from vtprune.scorers import Scorer, Signals, build_scorer
from vtprune.scorers.baselines import RandomScorer
from vtprune.scorers.cls import CLSScorer
from vtprune.scorers.debias import REFERENCE_SPAN, Debias, Trend, padding_bands, padding_fraction
from vtprune.scorers.fastv import FastVScorer
from vtprune.scorers.pyramiddrop import PyramidDropScorer
from vtprune.scorers.select import select_topk
from vtprune.scorers.sink import Sink, known_sink_dims, massive_activation, rank_last
from vtprune.toy.tiny import tiny_llava_processor

# FastV's weight file as its per-index cubic 1/w = 1 + 3.015e-3 j - 1.460e-5 j^2 + 2.569e-8 j^3, in x = j / 575
FASTV_CUBIC = (1.0, 3.015e-3 * REFERENCE_SPAN, -1.460e-5 * REFERENCE_SPAN**2, 2.569e-8 * REFERENCE_SPAN**3)
TREND = Trend("cubic", FASTV_CUBIC, "test")


class Fixed(Scorer):
    """Host returning given per-sample scores (not registered)."""

    name = "fixed"
    description = "test"

    def __init__(self, values: list[torch.Tensor]) -> None:
        self.values = values

    def score(self, signals):
        return [v.clone() for v in self.values]


class FixedFastV(Fixed):
    name = "fastv"
    debias_release = FastVScorer.debias_release  # looks like FastV to debias's default


def layout(spans: list[int]) -> VisualLayout:
    """One sample holding images of the given token counts."""
    n = sum(spans)
    image = torch.cat([torch.full((k,), i) for i, k in enumerate(spans)])
    return VisualLayout(positions=[torch.arange(n)], image=[image], prunable=[torch.ones(n, dtype=torch.bool)],
                        source=[torch.arange(n)], coords=[torch.zeros(n, 3, dtype=torch.long)], seq_len=n)


# ---- debias (a): the positional trend ------------------------------------------------------------
def test_default_trends_match_the_reference_weights():
    fastv = Debias(FastVScorer())
    w = fastv.weights(Signals(layout=layout([576]), stage="llm"))[0]
    assert w[0] == 1 and abs(float(w[-1]) - 0.358) < 1e-3  # the cubic fitted to the FastV weight file
    assert bool((torch.diff(w) <= 0).all())
    other = Debias(RandomScorer()).weights(Signals(layout=layout([576]), stage="llm"))[0]
    assert abs(float(other[-1]) - np.exp(-2.30e-3 * 575)) < 1e-4 and abs(float(other[100]) - np.exp(-0.23)) < 1e-4
    flat = Debias(FastVScorer(), trend="none").weights(Signals(layout=layout([10]), stage="llm"))[0]
    assert torch.equal(flat, torch.ones(10))
    assert "FastV cubic" in fastv.trend_source and "exponential" in Debias(RandomScorer()).trend_source


@pytest.mark.parametrize("trend", ["default", list(FASTV_CUBIC[1:])])
def test_debias_removes_a_planted_positional_trend(trend):
    """Scores = T(x) * c per image (two images, 100 and 60 tokens): flat content becomes position-free and
    the few planted tokens (c = 2) are exactly what debias keeps; the raw host keeps the late tokens."""
    spans, planted = [100, 60], [[3, 20, 41], [2, 15, 30]]
    values, want = [], []
    for i, n in enumerate(spans):
        c = torch.ones(n)
        c[planted[i]] = 2.0
        values.append(TREND(torch.arange(n) / (n - 1)).float() * c)
        want += [sum(spans[:i]) + j for j in planted[i]]
    scores = [torch.cat(values)]
    sig = Signals(layout=layout(spans), stage="llm", layer=2, keep=3)
    raw = select_topk(scores, sig.layout, 3)[0].tolist()
    assert not set(raw) & set(want)  # the trend wins: the raw host keeps the last tokens
    deb = Debias(FixedFastV(scores), trend=trend)
    out = deb.score(sig)
    assert select_topk(out, sig.layout, 3)[0].tolist() == want
    flat = out[0][[j for j in range(sum(spans)) if j not in want]]
    torch.testing.assert_close(flat, torch.ones_like(flat), atol=1e-5, rtol=1e-5)


def test_debias_keeps_excluded_tokens_excluded():
    scores = [torch.tensor([0.5, float("-inf"), 0.2, 0.9])]
    out = Debias(Fixed(scores), trend="default").score(Signals(layout=layout([4]), stage="pre-llm", keep=4))
    assert out[0][1] == float("-inf") and bool(torch.isfinite(out[0][[0, 2, 3]]).all())


def test_fit_trend_recovers_a_planted_trend_and_stays_increasing():
    gen = torch.Generator().manual_seed(0)
    spans = []
    for n in (576, 300, 130, 576):  # different spans per image, as on Qwen
        x = torch.arange(n) / (n - 1)
        spans.append(3.0 * TREND(x).float() * (1 + 0.1 * torch.randn(n, generator=gen)).clamp(min=0.1))
    coeffs = fit_trend(spans)
    grid = torch.linspace(0, 1, 51)
    fitted = Trend("cubic", tuple(coeffs), "fit")(grid)
    assert coeffs[0] == 1.0
    assert float(((fitted - TREND(grid)) / TREND(grid)).abs().max()) < 0.05
    # a falling score profile must not give a trend that falls or crosses zero
    down = fit_trend([torch.linspace(2, 0.01, 200), torch.linspace(1.5, 0.02, 150)])
    values = Trend("cubic", tuple(down), "fit")(grid)
    assert float(values.min()) > 0 and float(torch.diff(values).min()) >= -1e-9
    with pytest.raises(CalibrationError, match="non-positive mean"):
        fit_trend([-torch.ones(50)])


# ---- debias (b): padding sinks (LLaVA-1.5 pad-to-square) ---------------------------------------------
def pad_to_square(img: Image.Image, color) -> Image.Image:
    """LLaVA's expand2square: centre the image on a square canvas of the image-mean colour."""
    w, h = img.size
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), color)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def mean_color(proc):
    return tuple(int(x * 255) for x in proc.image_processor.image_mean)


def test_padding_geometry_from_the_pixels(processor):
    img = make_image(400, 500, seed=3)  # landscape: bands at top and bottom, 33.6 px each at 336
    wide = processor.image_processor(images=[pad_to_square(img, mean_color(processor))], return_tensors="pt")
    axis, top, bottom = padding_bands(wide["pixel_values"][0])
    assert axis == 0 and abs(top - 33.6) <= 2 and abs(bottom - 33.6) <= 2
    frac = padding_fraction(wide["pixel_values"][0], 24)
    assert frac.shape == (24, 24)
    rows = (frac > 0.5).all(1)
    assert rows.nonzero().flatten().tolist() == [0, 1, 22, 23]  # rows 2 and 21 are ~0.4 padding: kept
    tall = processor.image_processor(images=[pad_to_square(img.rotate(90, expand=True), (255, 255, 255))],
                                     return_tensors="pt")["pixel_values"][0]
    assert padding_bands(tall)[0] == 1 and int((padding_fraction(tall, 24) > 0.5).all(0).sum()) == 4
    plain = processor.image_processor(images=[img], return_tensors="pt")["pixel_values"][0]
    assert padding_bands(plain) is None and padding_fraction(plain, 24) is None
    framed = plain.clone()
    framed[:, :20], framed[:, -20:], framed[:, :, :20], framed[:, :, -20:] = 0.0, 0.0, 0.0, 0.0
    assert padding_bands(framed) is None  # bands on all four sides: not pad-to-square


@pytest.mark.parametrize("method,layer", [("debias+fastv", 2), ("debias+cls", None)])
def test_padding_patches_are_excluded_and_the_budget_shrinks(method, layer, processor):
    model = get_model("llava")
    img = make_image(400, 500, seed=3)
    padded = pad_to_square(img, mean_color(processor))
    prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    inputs = processor(images=[padded, img], text=[prompt, prompt], return_tensors="pt", padding=True)
    vtprune.apply(model, method=method, keep=1.0, layer=layer)
    with torch.no_grad():
        model(**inputs)
    st = vtprune.stats(model)
    deb = model._vtprune_state.scorer
    assert st.visual_after == [576 - 96, 576]  # 4 of 24 patch rows are mostly padding
    assert deb.last_padding[0].numel() == 96 and deb.last_padding[1].numel() == 0
    assert not set(deb.last_padding[0].tolist()) & set(st.kept[0].tolist())
    rows = torch.unique(deb.last_padding[0] // 24).tolist()
    assert rows == [0, 1, 22, 23]
    vtprune.apply(model, method=method, keep=500, layer=layer)  # more than the valid patches: clipped to them
    with torch.no_grad():
        model(**inputs)
    assert vtprune.stats(model).visual_after == [480, 500]
    vtprune.apply(model, method=method, keep=1.0, layer=layer, pad_theta=None)
    with torch.no_grad():
        model(**inputs)
    assert vtprune.stats(model).visual_after == [576, 576]
    vtprune.remove(model)


def test_zero_padding_keeps_the_budget_and_ranks_padding_last(processor):
    """pad_mode="zero" (the PyramidDrop / SparseVLM patches' rule): padding patches score 0, so they are kept
    only once every valid patch is, and the budget is not lowered; pyramiddrop's release defaults use it with
    threshold 0.01, which also takes the ~0.4-padding rows 2 and 21."""
    model = get_model("llava")
    padded = pad_to_square(make_image(400, 500, seed=3), mean_color(processor))
    prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    inputs = processor(images=[padded], text=[prompt], return_tensors="pt")
    for keep, n_pad in ((500, 20), (300, 0)):  # 480 valid patches at pad_theta 0.5
        vtprune.apply(model, method="debias+fastv", keep=keep, pad_mode="zero")
        with torch.no_grad():
            model(**inputs)
        st, deb = vtprune.stats(model), model._vtprune_state.scorer
        assert st.visual_after == [keep] and deb.last_padding[0].numel() == 96
        assert len(set(deb.last_padding[0].tolist()) & set(st.kept[0].tolist())) == n_pad
    deb = Debias(PyramidDropScorer())
    assert (deb._pad_theta, deb._pad_mode, "PyramidDrop" in deb.trend_source) == (0.01, "zero", True)
    vtprune.apply(model, method="debias+pyramiddrop", keep=72)
    with torch.no_grad():
        model(**inputs)
    rows = torch.unique(model._vtprune_state.scorer.last_padding[0] // 24).tolist()
    vtprune.remove(model)
    assert rows == [0, 1, 2, 21, 22, 23]  # recorded at the first stage, the one corrected
    explicit = Debias(PyramidDropScorer(), pad_theta=0.5, pad_mode="exclude", trend="exp:2.3e-3")
    assert (explicit._pad_theta, explicit._pad_mode) == (0.5, "exclude") and "0.0023" in explicit.trend_source


def test_debias_corrects_the_first_stage_only_unless_every_stage():
    """The release's PyramidDrop and SparseVLM patches debias the first stage: a pre-LLM stage where the host
    has one, else in-LLM stage 0; every_stage=True corrects them all."""
    lay = layout([10])
    scores = [torch.linspace(1, 2, 10)]
    deb = Debias(FixedFastV(scores), trend="exp:0.1", pad_theta=None)
    calls = [Signals(layout=lay, stage="llm", stage_index=j) for j in (0, 1, 2)]
    first = [not torch.equal(deb.score(sig)[0], scores[0]) for sig in calls]
    assert first == [True, False, False]
    pre = [Signals(layout=lay, stage="pre-llm"), *calls[:2]]
    assert [not torch.equal(deb.score(sig)[0], scores[0]) for sig in pre] == [True, False, False]
    assert [not torch.equal(deb.score(sig)[0], scores[0]) for sig in calls[:1]] == [True]  # the next prefill
    every = Debias(FixedFastV(scores), trend="exp:0.1", pad_theta=None, every_stage=True)
    assert all(not torch.equal(every.score(sig)[0], scores[0]) for sig in pre + calls)


def test_per_index_trend_specs_are_the_release_files_curves():
    exp = Debias(RandomScorer(), trend="exp:3.99e-3")._trend.weights(576).double()
    torch.testing.assert_close(exp, torch.exp(-3.99e-3 * torch.arange(576.0, dtype=torch.float64)), rtol=1e-6, atol=0)
    cubic = Debias(RandomScorer(), trend="cubic:3.015e-3,-1.460e-5,2.569e-8")._trend.weights(576)
    torch.testing.assert_close(cubic, Trend("cubic", FASTV_CUBIC, "x").weights(576))
    for bad in ("exp:", "exp:1,2", "cubic:1,2", "exp:abc"):
        with pytest.raises(ConfigError, match="exp:<lambda>"):
            Debias(RandomScorer(), trend=bad)
    with pytest.raises(ConfigError, match="pad_mode"):
        Debias(RandomScorer(), pad_mode="drop")
    with pytest.raises(ConfigError, match="every_stage"):
        Debias(RandomScorer(), every_stage="yes")


def test_padding_is_only_for_llava_1_5():
    nxt = get_model("next")
    deb = Debias(FastVScorer())
    from vtprune.adapters import adapter_for

    deb.bind(nxt, adapter_for(nxt))
    assert not deb.needs_signal("pixel_values")
    llava = get_model("llava")
    deb.bind(llava, adapter_for(llava))
    assert deb.needs_signal("pixel_values") and deb.needs_signal("llm_attention")


# ---- sink -----------------------------------------------------------------------------------------
def test_massive_activation_and_rank_last():
    h = torch.randn(6, 64) * 0.05
    h[2, 3] = 10.0
    phi = massive_activation(h)
    assert float(phi[2, 3]) > 7.9 and float(phi[2, 3]) <= 8.0  # at most sqrt(D)
    s = torch.tensor([0.9, 0.1, 0.8, float("-inf"), 0.3, 0.7])
    sinks = torch.tensor([True, False, True, True, False, False])
    low = rank_last(s, sinks)
    assert low[3] == float("-inf")
    assert torch.argsort(low, descending=True).tolist()[:5] == [5, 4, 1, 0, 2]  # sinks last, in host order
    high = rank_last(s, sinks, first=True)
    assert torch.argsort(high, descending=True).tolist()[:5] == [0, 2, 5, 4, 1]
    assert bool((Debias(Fixed([low]), trend="default").score(Signals(layout=layout([6]), stage="llm"))[0][[0, 2]]
                 < 0).all())  # an outer positive rescaling keeps them below non-negative scores


def test_sink_drops_planted_sinks_and_refills_the_budget():
    n = 20
    h = torch.randn(n, 64) * 0.05
    planted = [4, 9, 17]
    h[planted, torch.tensor([3, 17, 3])] = 10.0
    scores = [torch.linspace(0.1, 1.0, n)]  # the planted tokens would rank high: 17 is third from the top
    sig = Signals(layout=layout([n]), stage="llm", layer=2, keep=5, hidden_states=[h])
    drop = Sink(Fixed(scores), dims=[3, 17], tau=5)
    kept = select_topk(drop.score(sig), sig.layout, 5)[0].tolist()
    assert drop.last_sinks[0].tolist() == planted
    assert kept == [14, 15, 16, 18, 19]  # five tokens still kept: the budget is refilled
    keep = Sink(Fixed(scores), dims=[3, 17], tau=5, mode="keep")
    assert set(planted) <= set(select_topk(keep.score(sig), sig.layout, 5)[0].tolist())


def plant_sinks(model, input_ids, visual_idx, dims, value=10.0):
    """Forward hook on decoder layer 0: add ``value`` in one of ``dims`` to the given visual tokens."""
    token = model.config.image_token_id
    rows, cols, dim = [], [], []
    for b in range(input_ids.shape[0]):
        pos = torch.nonzero(input_ids[b] == token).flatten()
        for i, j in enumerate(visual_idx):
            rows.append(b)
            cols.append(int(pos[j]))
            dim.append(dims[i % len(dims)])

    def hook(module, args, kwargs, output):
        h = output[0] if isinstance(output, tuple) else output
        if h.shape[1] != input_ids.shape[1]:
            return None
        h = h.clone()
        h[rows, cols, dim] += value
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return model.model.language_model.layers[0].register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("mode", ["drop", "keep"])
def test_sink_on_a_model_with_planted_massive_activations(mode, processor):
    model = get_model("llava")
    inputs = batch(processor, [1, 1])
    planted = [5, 100, 300, 301]
    handle = plant_sinks(model, inputs["input_ids"], planted, dims=[3, 17])
    try:
        vtprune.apply(model, method="sink+fastv", keep=40, layer=1, dims=[3, 17], tau=5, mode=mode)
        with torch.no_grad():
            model(**inputs)
        st = vtprune.stats(model)
        sink = model._vtprune_state.scorer
        for b in range(2):
            assert sink.last_sinks[b].tolist() == planted
            overlap = set(planted) & set(st.kept[b].tolist())
            assert overlap == (set() if mode == "drop" else set(planted))
            assert st.visual_after[b] == 40
    finally:
        handle.remove()
        vtprune.remove(model)


def test_sink_errors_name_the_fix():
    with pytest.raises(ConfigError, match="runs only inside the LLM"):
        build_scorer("sink+cls", {"dims": [1]})
    with pytest.raises(ConfigError, match="runs only inside the LLM"):
        Sink(CLSScorer(), dims=[1])
    model = get_model("llava")
    vtprune.apply(model, method="sink", keep=8, dims=[1], tau=3.0)  # bare sink: sink+uniform after layer 2
    try:
        with torch.no_grad():
            model(**batch(tiny_llava_processor(), [1]))
        assert vtprune.stats(model).layer == 2 and vtprune.stats(model).visual_after == [8]
    finally:
        vtprune.remove(model)
    vtprune.apply(model, method="sink+fastv", keep=8)  # hidden size 64: no published dims -> found on the fly
    assert "on the fly" in model._vtprune_state.scorer.dims_source
    vtprune.remove(model)
    with pytest.raises(ConfigError, match="out of range"):
        vtprune.apply(model, method="sink+fastv", keep=8, dims=[64])
    with pytest.raises(ConfigError, match="mode"):
        build_scorer("sink+fastv", {"mode": "maybe"})
    with pytest.raises(ConfigError, match="dims"):
        build_scorer("sink+fastv", {"dims": []})
    with pytest.raises(ConfigError, match="cannot stand last"):
        build_scorer("debias", {})
    with pytest.raises(ConfigError, match="^debias: pad_theta"):  # named once, not "debias: debias: ..."
        build_scorer("debias+fastv", {"pad_theta": 2})
    with pytest.raises(ConfigError, match="neither 'auto'"):
        build_scorer("debias+fastv", {"trend": "/no/such/file.json"})
    assert not hasattr(model, "_vtprune_state")


def test_known_sink_dims_for_llama2_shapes():
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlavaConfig

    def fake(hidden, inter):
        return SimpleNamespace(config=LlavaConfig(text_config=LlamaConfig(hidden_size=hidden, intermediate_size=inter)))

    assert known_sink_dims(fake(4096, 11008)) == (1415, 2533)
    assert known_sink_dims(fake(5120, 13824)) == (2100, 4743)
    assert known_sink_dims(fake(4096, 14336)) is None  # Llama-3-8B: same width, not published


# ---- composition ----------------------------------------------------------------------------------
def test_composition_strings_and_objects_run(processor):
    model = get_model("llava")
    inputs = batch(processor, [1])
    s = build_scorer("debias+sink+fastv", {"dims": [3], "tau": 5.0, "trend": "default"})
    assert isinstance(s, Debias) and isinstance(s.inner, Sink) and isinstance(s.inner.inner, FastVScorer)
    for method, opts in [("debias+sink+fastv", {"dims": [3], "tau": 5.0}), ("sink", {"dims": [3]}),
                         ("debias+random", {}), ("debias+uniform", {"layer": 1})]:
        opts = dict(opts)
        layer = opts.pop("layer", 1 if method == "sink" else None)
        vtprune.apply(model, method=method, keep=32, layer=layer, **opts)
        with torch.no_grad():
            model(**inputs)
        assert vtprune.stats(model).visual_after == [32]
    assert model._vtprune_state.scorer.inner.name == "uniform"
    vtprune.apply(model, method="sink", keep=32, layer=1, dims=[3])
    assert model._vtprune_state.scorer.inner.name == "uniform"  # "sink" alone is sink+uniform
    vtprune.apply(model, Debias(Sink(FastVScorer(), dims=[3, 5], tau=5.0), pad_theta=None), keep=32)
    cfg = vtprune.config_of(model)
    assert cfg.method == "debias+sink+fastv" and cfg.layer is None
    assert cfg.options == {"debias.pad_theta": None, "sink.tau": 5.0, "sink.dims": [3, 5]}
    with torch.no_grad():
        model(**inputs)
    assert vtprune.stats(model).visual_after == [32] and vtprune.stats(model).layer == 2
    vtprune.remove(model)


# ---- in-LLM exactness: drop == mask -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", ["debias+fastv", "sink+fastv"])
def test_drop_equals_masking(kind, method, processor):
    model = get_model(kind)
    inputs = batch(processor, [1, 1]) if kind == "llava" else qwen_batch(kind, "left_padded_2")
    handle = None
    opts = {}
    if method.startswith("sink"):
        handle = plant_sinks(model, inputs["input_ids"], [2, 7, 30], dims=[3, 17])
        opts = dict(dims=[3, 17], tau=5)
    layer = 1
    try:
        vtprune.apply(model, method=method, keep=24, layer=layer, **opts)
        with torch.no_grad():
            pruned = model(**inputs).logits
        st = vtprune.stats(model)
        scorer = model._vtprune_state.scorer
        vtprune.remove(model)
        if method.startswith("sink"):
            assert all(s.tolist() == [2, 7, 30] for s in scorer.last_sinks)
            assert all(not {2, 7, 30} & set(k.tolist()) for k in st.kept)
        dropped = dropped_positions(model, inputs["input_ids"], st)
        assert int(dropped.sum()) > 0
        ref = masked_logits(model, inputs, layer, dropped)
    finally:
        if handle is not None:
            handle.remove()
        vtprune.remove(model)
    check = inputs["attention_mask"].bool() & ~dropped
    torch.testing.assert_close(pruned[check], ref[check], atol=2e-5, rtol=1e-4)


# ---- calibration ----------------------------------------------------------------------------------
def write_images(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_image(300 + 20 * i, 400, seed=i).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image, ignored")
    return folder


def test_calibrate_cli_writes_a_file_the_wrappers_read(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    images = write_images(tmp_path / "imgs", 4)
    out = tmp_path / "cal" / "tiny-llava.json"
    assert main(["calibrate", "--model", "tiny-llava", "--images", str(images), "--limit", "3",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert str(out) in text and "trend" in text and "sink dims" in text
    data = json.loads(out.read_text())
    assert data["format"] == 1 and data["model_type"] == "llava" and data["hidden_size"] == 64
    assert data["name_or_path"] == "tiny-llava"
    entry = data["trend"]["fastv"]
    assert entry["layer"] == 2 and entry["n_images"] == 3 and entry["coeffs"][0] == 1.0
    assert data["sink"]["dims"] == [] and "no sink dimensions" in data["sink"]["note"]  # phi <= 8 at D = 64
    t = Trend("cubic", tuple(entry["coeffs"]), "file")(torch.linspace(0, 1, 21))
    assert float(t.min()) > 0 and float(torch.diff(t).min()) >= -1e-9

    model = get_model("llava")  # same model type and width: the file applies
    vtprune.apply(model, method="debias+fastv", keep=16, trend=str(out))
    assert str(out) in model._vtprune_state.scorer.trend_source
    with pytest.raises(ConfigError, match="found no sink dimensions"):
        vtprune.apply(model, method="sink+fastv", keep=16, calibration=str(out))
    with pytest.raises(ConfigError, match="no trend for host 'random'"):
        vtprune.apply(model, method="debias+random", keep=16, trend=str(out))
    # automatic lookup by key: $VTPRUNE_CALIBRATION_DIR/<key>.json (the unnamed test model: llava-64)
    assert calibration_key(model) == "llava-64"
    monkeypatch.setenv("VTPRUNE_CALIBRATION_DIR", str(tmp_path / "cal"))
    vtprune.apply(model, method="debias+fastv", keep=16)
    assert "default" in model._vtprune_state.scorer.trend_source  # tiny-llava.json is not llava-64.json
    (tmp_path / "cal" / "llava-64.json").write_text(out.read_text())
    vtprune.apply(model, method="debias+fastv", keep=16)
    assert "llava-64.json" in model._vtprune_state.scorer.trend_source
    vtprune.remove(model)
    # a file made for another model is refused
    qwen = get_model("qwen2_vl")
    with pytest.raises(ConfigError, match="was made for model_type='llava'"):
        vtprune.apply(qwen, method="debias+fastv", keep=16, trend=str(out))
    assert not hasattr(qwen, "_vtprune_state")


def test_calibrate_finds_planted_sink_dims(tmp_path, processor):
    model = get_model("llava")
    prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    ids = processor(images=[make_image(300, 300, 0)], text=[prompt], return_tensors="pt")["input_ids"]
    token = model.config.image_token_id

    def hook(module, args, kwargs, output):  # massive activations on the first token (BOS) and on 2 visual ones
        h = (output[0] if isinstance(output, tuple) else output).clone()
        assert h.shape[1] == ids.shape[1]
        vis = torch.nonzero(ids[0] == token).flatten()
        h[0, 0, 3] += 10.0
        h[0, 0, 17] += 10.0
        h[0, vis[[10, 50]], 17] += 10.0
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = model.model.language_model.layers[0].register_forward_hook(hook, with_kwargs=True)
    try:
        data = calibrate(model, processor, [make_image(300, 300, i) for i in range(2)], prompts=[prompt], tau=4,
                         progress=False)
    finally:
        handle.remove()
    assert data["sink"]["dims"] == [3, 17] and data["sink"]["layers"] == [2, 3]
    assert abs(data["sink"]["visual_sink_fraction"] - 2 / 576) < 1e-9
    path = save_calibration(data, tmp_path / "planted.json")
    sink = Sink(FastVScorer(), calibration=str(path), tau=4)
    from vtprune.adapters import adapter_for

    sink.bind(model, adapter_for(model))
    assert sink._dims == [3, 17] and "planted.json" in sink.dims_source
    assert not hasattr(model, "_vtprune_state")


def test_sink_dims_on_the_fly_from_the_first_token(processor):
    """No dims, no calibration file: the sink dimensions are the first token's massive activations in the
    prefill itself (VAR's definition), per sample; visual tokens massive there rank last."""
    model = get_model("llava")
    inputs = batch(processor, [1, 1])
    ids = inputs["input_ids"]
    token = model.config.image_token_id
    first = inputs["attention_mask"].int().argmax(1)  # left padding: each row's first real token

    def hook(module, args, kwargs, output):  # sample 0: dims 3 and 17 massive on its first token; sample 1: 5
        h = (output[0] if isinstance(output, tuple) else output).clone()
        if h.shape[1] != ids.shape[1]:
            return None  # decode steps
        vis0 = torch.nonzero(ids[0] == token).flatten()
        vis1 = torch.nonzero(ids[1] == token).flatten()
        h[0, first[0], 3] += 40.0
        h[0, first[0], 17] += 40.0
        h[0, vis0[[10, 50]], 17] += 40.0
        h[0, vis0[70], 5] += 40.0  # massive, but not in sample 0's sink dims
        h[1, first[1], 5] += 40.0
        h[1, vis1[[7]], 5] += 40.0
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = model.model.language_model.layers[0].register_forward_hook(hook, with_kwargs=True)
    try:
        vtprune.apply(model, method="sink+fastv", keep=8, layer=1, tau=4.0)
        sink = model._vtprune_state.scorer
        with torch.no_grad():
            model(**inputs)
        st = vtprune.stats(model)
    finally:
        handle.remove()
        vtprune.remove(model)
    assert [d.tolist() for d in sink.last_dims] == [[3, 17], [5]]
    assert [s.tolist() for s in sink.last_sinks] == [[10, 50], [7]]
    assert not set(st.kept[0].tolist()) & {10, 50} and 7 not in st.kept[1].tolist()


def test_calibrate_bad_inputs(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["calibrate", "--model", "tiny-llava", "--images", str(empty)]) == 2
    assert "no .png or .jpg files" in capsys.readouterr().err
    assert main(["calibrate", "--model", "tiny-llava", "--images", str(tmp_path / "nope")]) == 2
    assert "neither a directory nor a file" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"this is not a png")
    assert main(["calibrate", "--model", "tiny-llava", "--images", str(bad), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "not a readable image" in err
    assert main(["calibrate", "--model", "tiny-llava", "--images", str(bad), "--limit", "0"]) == 2
    assert "--limit" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
