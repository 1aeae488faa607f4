"""`vtprune tune`: the search, the spaces methods declare, the fidelity objective and the config files."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import get_model, make_image

import vtprune
from vtprune.cli import main
from vtprune.config import ConfigError, PruneConfig
from vtprune.loading import toy_weights_dir
from vtprune.toy.tiny import tiny_llava_processor
from vtprune.tune import (
    Param,
    TuneResult,
    calibration_batches,
    load_config,
    random_search,
    search_space,
    tune,
)


def test_param_samples_stay_in_bounds():
    rng = random.Random(0)
    for p in (Param("int", 2, 5), Param("float", 0.1, 0.2), Param("log", 1e-4, 1.0), Param("choice", choices=(3, 7))):
        values = [p.sample(rng) for _ in range(200)]
        assert all(p.contains(v) for v in values)
    logs = [Param("log", 1e-4, 1.0).sample(rng) for _ in range(400)]
    assert sum(v < 1e-2 for v in logs) > 100  # log-uniform: half the draws below the geometric middle


def test_random_search_starts_from_the_defaults_and_finds_the_best_point():
    space = {"a": Param("int", 0, 9), "b": Param("choice", choices=("x", "y"))}
    seen = []

    def objective(p):
        seen.append(p)
        return -abs(p["a"] - 7) + (0.5 if p["b"] == "y" else 0.0)

    results = random_search(space, {"a": 0, "b": "x"}, objective, trials=20, seed=3)
    assert results[0] == ({"a": 0, "b": "x"}, -7.0)
    assert len({json.dumps(p, sort_keys=True) for p, _ in results}) == len(results)  # no point twice
    best = max(results, key=lambda r: r[1])[0]
    assert best == {"a": 7, "b": "y"}
    again = random_search(space, {"a": 0, "b": "x"}, objective, trials=20, seed=3)
    assert [p for p, _ in again] == [p for p, _ in results]  # seeded


def test_search_spaces_follow_the_method(llava):
    n = len(llava.model.language_model.layers)
    space, start = search_space(llava, "fastv")
    assert space == {"layer": Param("int", 0, n - 2)} and start == {"layer": 2}
    space, start = search_space(llava, "cls")
    assert space["cls.vision_layer"].choices == (1, 2) and start["cls.vision_layer"] == 2  # -2 of 3 layers
    space, _ = search_space(llava, "debias+fastv")
    assert set(space) == {"debias.pad_theta", "layer"}
    space, _ = search_space(llava, "visionzip", {"contextual_ratio": 0.2})  # a given option is held fixed
    assert space == {}
    space, _ = search_space(llava, "fastv", layer=1)  # a given layer is held fixed
    assert space == {}


@pytest.fixture(scope="module")
def calibration():
    model = get_model("llava")
    return calibration_batches(model, tiny_llava_processor(), [make_image(300, 420, s) for s in range(6)], batch_size=3)


def test_tune_finds_the_known_best_layer_and_writes_a_loadable_file(calibration, tmp_path):
    """Dropping after the last possible layer disturbs the final state least: the search must find it."""
    model = get_model("llava")
    n = len(model.model.language_model.layers)
    result = tune(model, calibration, "fastv", 16, trials=5)
    points = [t["point"]["layer"] for t in result.trials]
    assert points[0] == 2 and sorted(points) == list(range(n - 1))  # the defaults first, then every layer once
    values = {t["point"]["layer"]: t["objective"] for t in result.trials}
    assert result.config.layer == max(values, key=values.get) == n - 2
    assert result.objective >= result.baseline and 0 < result.objective < 1
    path = result.save(tmp_path / "tuned.json")
    assert load_config(path) == result.config
    vtprune.apply(model, config=str(path))
    assert model._vtprune_state.config == result.config
    vtprune.remove(model)


def test_keep_all_is_perfectly_faithful_and_keeps_the_defaults(calibration):
    model = get_model("llava")
    result = tune(model, calibration, "visionzip", 1.0, trials=4)
    assert all(t["objective"] == pytest.approx(1.0, abs=1e-6) for t in result.trials)
    assert result.config.options == {"visionzip.contextual_ratio": 0.15625}  # ties keep the first (the defaults)


def test_nothing_to_tune_is_a_clear_error(calibration):
    with pytest.raises(ConfigError, match="no tunable hyperparameters"):
        tune(get_model("llava"), calibration, "divprune", 16, trials=3)


def test_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="is not JSON"):
        load_config(tmp_path / "bad.json")
    cfg = PruneConfig(method="cls", keep=32)
    (tmp_path / "plain.json").write_text(cfg.to_json())
    assert load_config(tmp_path / "plain.json") == cfg
    TuneResult(cfg, 0.9, 0.8).save(tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["format"] == "vtprune-tuned/1"


def test_cli_tune_then_eval_with_the_config(tmp_path, capsys):
    if not toy_weights_dir("toy-llava").is_dir():
        pytest.skip("toy-llava is not built")
    out = tmp_path / "tuned.json"
    assert main(["tune", "--model", "toy-llava", "--method", "fastv", "--keep", "4", "--trials", "3",
                 "--samples", "8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "defaults" in text and f"wrote            {out}" in text
    cfg = load_config(out)
    assert cfg.method == "fastv" and cfg.keep == 4 and cfg.layer in (0, 1, 2)
    main(["eval", "--model", "toy-llava", "--config", str(out), "--limit", "8", "--out", str(tmp_path / "ev"), "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert any(r["method"] == "fastv (tuned.json)" and r["layer"] == cfg.layer for r in _cells(rows))


def _cells(data):
    return data["cells"] if isinstance(data, dict) and "cells" in data else data


@torch.no_grad()
def test_fidelity_objective_is_one_for_the_unpruned_model(calibration):
    from vtprune.tune import _last_token_states

    model = get_model("llava")
    a = _last_token_states(model, calibration)
    b = _last_token_states(model, calibration)
    assert a.shape == (6, model.config.text_config.hidden_size) and torch.equal(a, b)
