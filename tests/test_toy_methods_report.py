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
