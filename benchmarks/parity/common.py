"""Shared plumbing of the parity checks: vtprune against a method's own released code.

Each ``benchmarks/parity/<method>.py`` compares, on the same tiny model (random weights, and a variant with
peaked vision attention so that scores are well separated), the visual tokens vtprune keeps with those the
release keeps, and (where the release's output reaches the LLM) the first-token logits. The release is
never copied here: the check takes the path of a checkout the user fetched (``--ref PATH`` or the
environment variable ``VTPRUNE_PARITY_<METHOD>``) and imports the release's own functions from it; without
a path it prints why it skipped and exits 0.

    python benchmarks/parity/<method>.py --ref /path/to/checkout      # prints rows, writes the JSON
    python benchmarks/parity/report.py                                # benchmarks/results/parity.md

A check module defines ``ENV = env_name(method)``, ``LOGIT_TOLERANCE``, ``compare(ref: Path) -> rows`` and
``main(argv) -> int`` (`reference_path`, then `write_rows`); ``tests/test_parity.py`` runs every check whose
variable is set and asserts Jaccard 1 and logits within the tolerance.

Rows: ``{"method", "model", "variant", "budget", "jaccard", "kept_equal", "logit_max_abs"}``, one per
(model, variant, budget), written to ``benchmarks/results/parity/<method>.json`` with the command and the
reference's commit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "results" / "parity"


def env_name(method: str) -> str:
    """``VTPRUNE_PARITY_<METHOD>``: the environment variable holding the path of ``method``'s checkout."""
    return f"VTPRUNE_PARITY_{method.upper().replace('+', 'PLUS').replace('-', '_')}"


def reference_path(method: str, argv: list[str] | None = None, doc: str = "") -> tuple[Path | None, argparse.Namespace]:
    """The checkout given by ``--ref`` or ``VTPRUNE_PARITY_<METHOD>`` (None: skip), and the parsed args
    (``--ref``, ``--out``)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    env = env_name(method)
    ap.add_argument("--ref", default=os.environ.get(env), help=f"path of the release's checkout (or ${env})")
    ap.add_argument("--out", default=str(RESULTS), help="folder of the JSON rows")
    args = ap.parse_args(argv)
    if not args.ref:
        print(f"{method}: skipped: no reference checkout given (--ref PATH or {env}=PATH)")
        return None, args
    path = Path(args.ref).expanduser()
    if not path.is_dir():
        ap.error(f"--ref {path} is not a folder: give the path of a checkout of {method}'s release")
    return path, args


def load_file(path: Path, name: str, stubs: Iterable[str] = ()) -> types.ModuleType:
    """Import the single file ``path`` of a release as module ``name``; ``stubs``: module names its imports
    need that are irrelevant to the functions compared (replaced by empty modules, restored afterwards)."""
    saved = {}
    for stub in stubs:
        saved[stub] = sys.modules.get(stub)
        sys.modules[stub] = types.ModuleType(stub)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise SystemExit(f"cannot import {path}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        for stub, old in saved.items():
            if old is None:
                sys.modules.pop(stub, None)
            else:
                sys.modules[stub] = old


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    a, b = set(int(x) for x in a), set(int(x) for x in b)
    return len(a & b) / len(a | b) if a | b else 1.0


def commit_of(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def write_rows(method: str, rows: list[dict[str, Any]], ref: Path, args: argparse.Namespace, command: str) -> Path:
    """Print ``rows`` and write them with the command and the reference commit to ``OUT/<method>.json``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        logit = r.get("logit_max_abs")
        print(f"{method} {r['model']} {r['variant']} budget {r['budget']}: jaccard {r['jaccard']:.3f}"
              + (f", max |logit diff| {logit:.2e}" if logit is not None else ""))
    target = out / f"{method.replace('+', 'plus')}.json"
    target.write_text(json.dumps({"method": method, "command": command, "reference": str(ref.name),
                                  "reference_commit": commit_of(ref), "rows": rows}, indent=1))
    return target


def peaked(model: Any, factor: float = 8.0) -> Any:
    """The ``peaked`` variant: every vision-tower attention's query projection scaled by ``factor`` (in place),
    so that softmax attention concentrates on few keys and the methods' scores are well separated (ties
    between near-equal scores would otherwise decide parity)."""
    import torch

    with torch.no_grad():
        for name, module in model.named_modules():
            if ("vision" in name or "visual" in name) and name.endswith(("q_proj", "attn.qkv")):
                if name.endswith("attn.qkv"):  # Qwen-VL: fused qkv, the first third is q
                    third = module.weight.shape[0] // 3
                    module.weight[:third] *= factor
                    if module.bias is not None:
                        module.bias[:third] *= factor
                else:
                    module.weight.mul_(factor)
                    if module.bias is not None:
                        module.bias.mul_(factor)
    return model
