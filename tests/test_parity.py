"""Parity with the methods' released code (benchmarks/parity): each check runs only where the path of a
checkout of the release is given (``VTPRUNE_PARITY_<METHOD>=PATH``; CI has no network, so it skips there).
A check's ``compare(ref)`` returns its rows; each must keep the release's token set (Jaccard 1) and, where
the release's output reaches the LLM, its logits."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

PARITY = Path(__file__).resolve().parents[1] / "benchmarks" / "parity"
SHARED = ("common", "llava_repo_worker", "report")  # the checks' shared plumbing and the report, no checks
CHECKS = sorted(p.stem for p in PARITY.glob("*.py") if p.stem not in SHARED)


def _load(stem: str):
    sys.path.insert(0, str(PARITY))
    spec = importlib.util.spec_from_file_location(f"parity_{stem}", PARITY / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stem", CHECKS)
def test_parity_with_the_release(stem):
    module = _load(stem)
    env = module.ENV
    ref = os.environ.get(env)
    if not ref:
        pytest.skip(f"{env} not set (the path of a checkout of the release)")
    rows = module.compare(Path(ref))
    assert rows, "a parity check compares at least one budget"
    for r in rows:
        if r.get("asserted") is False:  # a recorded comparison of two variants (e.g. zoo's cross-precision row)
            continue
        assert r["jaccard"] == 1.0 and r["kept_equal"], r
        if r.get("logit_max_abs") is not None:
            assert r["logit_max_abs"] < module.LOGIT_TOLERANCE, r
        if r.get("feature_max_abs") is not None:  # merged features (PruMerge, VScan)
            assert r["feature_max_abs"] < getattr(module, "FEATURE_TOLERANCE", 1e-4), r


def test_parity_checks_skip_cleanly_without_a_checkout(capsys):
    for stem in CHECKS:
        module = _load(stem)
        env = os.environ.pop(module.ENV, None)
        try:
            assert module.main([]) == 0
        finally:
            if env is not None:
                os.environ[module.ENV] = env
        assert "skipped" in capsys.readouterr().out
