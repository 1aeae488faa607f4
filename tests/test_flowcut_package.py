"""FlowCut's own package (``flowcut==1.0.2`` on PyPI, installed into ``.venv-llava`` by
``scripts/setup_llava_repo.sh``) against vtprune's ``flowcut`` on the tiny ``llava_llama`` model: the
comparison of ``benchmarks/parity/flowcut.py`` (each side in its own process, since the package patches
transformers' and the repository's classes for good). Runs where the interpreter running the tests imports
``flowcut`` (the transformers 4.37 environment: ``.venv-llava/bin/python -m pytest -q``); skips elsewhere.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.transformers4

PARITY = Path(__file__).resolve().parents[1] / "benchmarks" / "parity"


def _check():
    sys.path.insert(0, str(PARITY))  # for its `common`
    spec = importlib.util.spec_from_file_location("parity_flowcut", PARITY / "flowcut.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows():
    check = _check()
    python = Path(sys.executable)
    if check.package_location(python) is None:
        pytest.skip(f"{python} cannot import flowcut (bash scripts/setup_llava_repo.sh installs {check.PACKAGE})")
    return check, check.compare(None, python=python)


def test_the_package_and_vtprune_keep_the_same_patches_and_give_the_same_logits(rows):
    """Every budget and variant: the same kept patches in the same order, the same patch counts entering
    each of the 24 vision layers, the same LLM inputs and first-token logits (float32 rounding only)."""
    check, rows = rows
    assert {(r["variant"], r["budget"]) for r in rows} == {(v, k) for v in check.VARIANTS for k in check.BUDGETS}
    for r in rows:
        assert r["jaccard"] == 1.0 and r["kept_equal"], r
        assert r["schedule_equal"], r
        assert r["stages"][0] == check.PATCHES and r["stages"][-1] == r["budget"], r
        assert r["feature_max_abs"] < check.FEATURE_TOLERANCE, r
        assert r["logit_max_abs"] < check.LOGIT_TOLERANCE, r


def test_the_sharp_variant_exercises_the_adaptive_schedule(rows):
    """On ``peaked x64`` the package prunes at every even-distance layer before the last (so the cumulative
    score and the entropy-adaptive count are compared, not only the last top-K); on the flat variants only
    the last stage prunes."""
    check, rows = rows
    for r in rows:
        if r["variant"] == "peaked x64":
            assert len(r["stages"]) == 12, r  # 576, then after layers 1, 3, ..., 21 (11 stages)
            assert all(a > b for a, b in zip(r["stages"], r["stages"][1:])), r
        else:
            assert r["stages"] == [check.PATCHES, r["budget"]], r


def test_the_check_skips_where_the_package_is_missing(monkeypatch, capsys, tmp_path):
    check = _check()
    monkeypatch.setenv("VTPRUNE_LLAVA_PYTHON", str(tmp_path / "no-python"))
    assert check.main(["--ref", "--out", str(tmp_path)]) == 0
    assert "skipped" in capsys.readouterr().out and not list(tmp_path.glob("*.json"))
    monkeypatch.delenv(check.ENV, raising=False)
    assert check.main(["--out", str(tmp_path)]) == 0  # not asked to run
    assert "skipped" in capsys.readouterr().out
