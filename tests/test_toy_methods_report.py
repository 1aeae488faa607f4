"""`benchmarks/toy_methods.py`'s agreement with the published record: ranks and Spearman's correlation."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mod():
    spec = importlib.util.spec_from_file_location("toy_methods", os.path.join(ROOT, "benchmarks", "toy_methods.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ranks_average_ties_and_spearman_bounds():
    mod = _mod()
    assert mod.ranks([3.0, 1.0, 1.0, 2.0]) == [4.0, 1.5, 1.5, 3.0]
    assert mod.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert mod.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert mod.spearman([1, 2, 3], [2, 1, 3]) == pytest.approx(0.5)
    assert math.isnan(mod.spearman([1, 1, 1], [1, 2, 3]))


def test_agreement_uses_the_methods_measured_at_the_budget():
    mod = _mod()
    record = mod.PUBLISHED_64
    # a toy that orders fastv, visionzip, vscan as the record does, and a cell at another budget that must not count
    cells = [{"method": "fastv", "keep": 7, "accuracy": 0.5}, {"method": "visionzip", "keep": 7, "accuracy": 0.8},
             {"method": "vscan", "keep": 7, "accuracy": 0.9}, {"method": "cls", "keep": 7, "accuracy": 0.1},
             {"method": "divprune", "keep": 16, "accuracy": 0.0}]
    rho, order = mod.agreement({"toy": {"cells": cells}}, "toy")
    assert order == ["fastv", "visionzip", "vscan"] and rho == pytest.approx(1.0)
    assert record["fastv"] < record["visionzip"] < record["vscan"]
    assert mod.agreement({"toy": {"cells": cells[:2]}}, "toy") is None


def test_a_method_rerun_keeps_the_full_grids_raw_results(tmp_path, monkeypatch):
    """A full run writes each grid's raw results to toy_methods_<model>/; a --method rerun replaces only its
    cells in toy_methods.json and writes its raw results to toy_methods_<model>_rerun/, not over the grid's."""
    mod = _mod()
    outs = []

    def fake_evaluate(argv):
        out = argv[argv.index("--out") + 1]
        outs.append(os.path.basename(out))
        methods = [argv[i + 1] for i, a in enumerate(argv) if a == "--method"]
        acc = 0.5 if "_rerun" in os.path.basename(out) else 0.25
        keeps = [float(argv[i + 1]) for i, a in enumerate(argv) if a == "--keep"]
        return {"baseline": {"accuracy": 1.0},
                "cells": [{"method": m, "keep": k, "accuracy": acc} for m in methods for k in keeps]}

    monkeypatch.setattr(mod, "evaluate", fake_evaluate)
    monkeypatch.setattr(mod, "refusals", lambda model, methods: {})
    common = ["--model", "toy-llava", "--out", str(tmp_path), "--limit", "10"]
    assert mod.main(common) == 0
    assert set(outs) == {"toy_methods_toy-llava", "toy_methods_toy-llava_exit"}
    outs.clear()
    assert mod.main([*common, "--method", "fastv", "--method", "dyvte"]) == 0
    assert set(outs) == {"toy_methods_toy-llava_rerun", "toy_methods_toy-llava_rerun_exit"}
    import json
    cells = json.loads((tmp_path / "toy_methods.json").read_text())["models"]["toy-llava"]["cells"]
    acc = {(c["method"], c["keep"]): c["accuracy"] for c in cells}
    assert acc[("fastv", 7)] == acc[("dyvte", 16)] == 0.5 and acc[("cls", 7)] == 0.25
    assert len(cells) == len(set(acc))  # every (method, keep) once
