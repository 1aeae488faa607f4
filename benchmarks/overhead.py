"""Ops and would-be host syncs vtprune adds per prefill and per decode step: every preset, tiny models.

    python benchmarks/overhead.py                                   # all presets, llava/next/qwen2_vl, batch 1, 8
    python benchmarks/overhead.py --models llava --methods fastv,cls --batch 1 --out /tmp/overhead.md

Counted with `vtprune.eval.opcount` (a TorchDispatchMode plus wrappers of Tensor.tolist/cpu/numpy/to) on
the CPU, where nothing syncs: a sync is an op that WOULD make the host wait on a GPU. "Added" means
attributed to vtprune's own code (the innermost frame outside torch is a vtprune file); the model's own
layers and generate() are not counted as added. Phases: ``generate(max_new_tokens=decode_steps + 1)``
split at each forward of the model (prefill = generate's set-up and the first forward; a decode step =
what follows one forward through the next). Prefill wall time: median of ``--repeats`` forwards with
the cache, pruned next to the unpatched model (tiny random models: Python overhead, not GPU time).

Batch B: B prompts of different lengths, one image each, left-padded. Presets the model refuses
(`ConfigError` / `UnsupportedModelError`) are reported as refused; any other exception as an error.

Programmatic use (tests): ``from benchmarks.overhead import measure; measure("llava", "fastv", 1)``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout run without installing

import vtprune  # noqa: E402
from vtprune.eval.opcount import count_prefill_decode  # noqa: E402

MODELS = ("llava", "next", "qwen2_vl")
ALL_MODELS = ("llava", "next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
KEEP = 0.25
# options sized for the 4-layer tiny models (as tests/test_presets.py uses them)
OPTIONS: dict[str, dict] = {
    "ensemble": {"members": ["random", "uniform"]},
    "transprune": {"layers": [0, 1, 2], "ratios": [0.5, 0.25]},
    "sparsevlm": {"layers": [0, 1, 2], "ratios": [0.5, 0.25]},
    "vflowopt": {"llm_layers": [1, 2], "cell": 8},
    "sink": {"dims": [3, 17], "tau": 4.0},
}
STAGED = {"transprune", "sparsevlm"}
LLM_LAYER = 2
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

_MODELS: dict[str, Any] = {}
_PROCESSORS: dict[str, Any] = {}
_BASELINES: dict[tuple, dict] = {}


# ------------------------------------------------------------------------------------------------
# models, inputs, presets
# ------------------------------------------------------------------------------------------------


def get_model(kind: str):
    """A cached tiny random model of ``kind`` (llava, next, qwen2_vl, qwen2_5_vl, qwen3_vl), unpatched."""
    if kind not in _MODELS:
        if kind.startswith("qwen"):
            from vtprune.toy.tiny_qwen import tiny_qwen

            _MODELS[kind] = tiny_qwen(kind)
        elif kind in ("llava", "next"):
            from vtprune.toy.tiny import tiny_llava

            _MODELS[kind] = tiny_llava(next_=kind == "next")
        else:
            raise ValueError(f"unknown model {kind!r}; choose from {', '.join(ALL_MODELS)}")
    model = _MODELS[kind]
    vtprune.remove(model)
    return model


def _processor(kind: str):
    if kind not in _PROCESSORS:
        if kind.startswith("qwen"):
            from vtprune.toy.tiny_qwen import tiny_qwen_processor

            _PROCESSORS[kind] = tiny_qwen_processor(kind)
        else:
            from vtprune.toy.tiny import tiny_llava_processor

            _PROCESSORS[kind] = tiny_llava_processor(next_=kind == "next")
    return _PROCESSORS[kind]


def _image(h: int, w: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def make_inputs(kind: str, batch: int) -> dict:
    """``batch`` prompts of different lengths, one image each, left-padded (processor outputs)."""
    proc = _processor(kind)
    if kind.startswith("qwen"):
        sizes = [(300, 400), (220, 330), (260, 260)]
        texts = [f"<|im_start|>user\n{QWEN_IMAGE}" + "What is in the picture? " * (i + 1)
                 + "<|im_end|>\n<|im_start|>assistant\n" for i in range(batch)]
    else:
        sizes = [(300, 620)] if kind == "next" else [(400, 500)]
        texts = ["USER: <image>\n" + "What is in the picture? " * (i + 1) + "ASSISTANT:" for i in range(batch)]
    images = [_image(*sizes[i % len(sizes)], seed=i) for i in range(batch)]
    proc.tokenizer.padding_side = "left"
    return dict(proc(images=images, text=texts, return_tensors="pt", padding=True))


def method_strings() -> list[str]:
    """Every preset of `vtprune.methods()`, wrappers without a default host on fastv (``debias+fastv``)."""
    try:
        from vtprune.scorers import registry

        reg = registry()
    except Exception:  # the scorer package's layout is not this benchmark's business
        reg = {}
    out = []
    for name in vtprune.methods():
        cls = reg.get(name)
        wrapper = getattr(cls, "is_wrapper", False) and not getattr(cls, "default_host", None)
        out.append(f"{name}+fastv" if wrapper else name)
    return out


def options_for(method: str, model, *, exact: bool = False) -> dict:
    """Method options for the tiny models; ``exact``: as the exactness tests use them (no recycling in
    sparsevlm, whose merged tokens the drop == mask references do not model)."""
    base = method.split("+")[0]
    if base in STAGED and model.config.model_type == "qwen3_vl":  # deepstack: only layer 2 of 4 qualifies
        opts = {"layers": [2], "ratios": []}
    else:
        opts = dict(OPTIONS.get(base, {}))
    if exact and base == "sparsevlm":
        opts["recycle"] = False
    return opts


def apply_preset(model, method: str, keep, layer: int | None = None, *, exact: bool = False) -> None:
    """`vtprune.apply` with `options_for`; an in-LLM preset without a default layer (``sink`` on its
    uniform host) gets layer `LLM_LAYER`, as tests/test_presets.py gives it."""
    opts = options_for(method, model, exact=exact)
    try:
        vtprune.apply(model, method=method, keep=keep, layer=layer, **opts)
    except vtprune.ConfigError as err:
        if layer is not None or "give layer=" not in str(err):
            raise
        vtprune.apply(model, method=method, keep=keep, layer=LLM_LAYER, **opts)


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------


def _prefill_seconds(model, inputs, repeats: int) -> float:
    times = []
    with torch.no_grad():
        model(**inputs, use_cache=True, logits_to_keep=1)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**inputs, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _vtprune_ms(model, inputs, repeats: int) -> float:
    """Milliseconds per prefill spent in vtprune's own code (`PartTimer`: plan, score, compact)."""
    timer = model._vtprune_state.timer
    timer.enabled, timer.seconds = True, {}
    try:
        _prefill_seconds(model, inputs, repeats)  # warm-up + repeats, all timed
    finally:
        timer.enabled = False
    return 1e3 * sum(timer.seconds.values()) / (repeats + 1)


def baseline(kind: str, batch: int, *, decode_steps: int = 2, repeats: int = 3) -> dict:
    """The unpatched model's counts and prefill time for (kind, batch) (cached)."""
    key = (kind, batch, decode_steps, repeats)
    if key not in _BASELINES:
        model, inputs = get_model(kind), make_inputs(kind, batch)
        counts = count_prefill_decode(model, inputs, decode_steps=decode_steps)
        _BASELINES[key] = dict(counts.as_dict(), prefill_ms=1e3 * _prefill_seconds(model, inputs, repeats))
    return _BASELINES[key]


def measure(model_kind: str, method: str, batch: int = 1, *, keep: int | float = KEEP, layer: int | None = None,
            decode_steps: int = 2, repeats: int = 3, options: dict | None = None, timing: bool = True) -> dict:
    """What vtprune adds for ``method`` on the tiny ``model_kind`` model at ``batch``.

    Returns a dict: ``model, batch, method, keep, refused`` (None or the refusal's message), ``error``
    (None or ``Type: message`` of another exception), ``prefill_ops_added``, ``prefill_syncs_added``,
    ``decode_ops_added_per_step``, ``decode_syncs_added_per_step``, ``prefill_sync_sites`` /
    ``decode_sync_sites`` (``"op @ file:line" -> n``, decode summed over the steps), ``model_syncs``
    (the pruned run's non-vtprune syncs, prefill and per decode step), ``vtprune_ms`` (the Python and torch
    time of vtprune's own plan / score / compact parts per prefill), ``prefill_ms_pruned`` /
    ``prefill_ms_unpruned`` (None without ``timing``), ``visual_before`` / ``visual_after``.
    """
    row: dict[str, Any] = dict(model=model_kind, batch=batch, method=method, keep=keep, refused=None, error=None)
    model = get_model(model_kind)
    inputs = make_inputs(model_kind, batch)
    base = baseline(model_kind, batch, decode_steps=decode_steps, repeats=repeats) if timing else None
    try:
        if options is None:
            apply_preset(model, method, keep, layer)
        else:
            vtprune.apply(model, method=method, keep=keep, layer=layer, **options)
    except (vtprune.ConfigError, vtprune.UnsupportedModelError) as err:
        row["refused"] = f"{type(err).__name__}: {err}"
        return row
    try:
        counts = count_prefill_decode(model, inputs, decode_steps=decode_steps)
        st = vtprune.stats(model)
        d = counts.as_dict()
        row.update(
            prefill_ops_added=d["prefill_vtprune_ops"],
            prefill_syncs_added=d["prefill_vtprune_syncs"],
            decode_ops_added_per_step=d["decode_vtprune_ops_per_step"],
            decode_syncs_added_per_step=d["decode_vtprune_syncs_per_step"],
            prefill_sync_sites=d["prefill_sync_sites"],
            decode_sync_sites=d["decode_sync_sites"],
            model_syncs=dict(prefill=d["prefill_model_syncs"], decode_per_step=d["decode_model_syncs_per_step"]),
            visual_before=list(getattr(st, "visual_before", []) or []),
            visual_after=list(getattr(st, "visual_after", []) or []),
            layer=getattr(st, "layer", None),
            prefill_ms_pruned=1e3 * _prefill_seconds(model, inputs, repeats) if timing else None,
            prefill_ms_unpruned=base["prefill_ms"] if base else None,
            vtprune_ms=_vtprune_ms(model, inputs, repeats) if timing else None,
        )
    except Exception as err:  # a preset broken on this model: report it, measure the others
        row["error"] = f"{type(err).__name__}: {err}"
        row["traceback"] = traceback.format_exc(limit=-4)
    finally:
        vtprune.remove(model)
    return row


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def _num(x) -> str:
    if x is None:
        return "-"
    return f"{x:g}" if isinstance(x, float) else str(x)


def _reason(row: dict) -> str:
    text = row["refused"] or (f"error: {row['error']}" if row["error"] else "")
    text = " ".join(text.split())
    return (text[:140] + "...") if len(text) > 140 else text.replace("|", "/")


def markdown(rows: list[dict], header: str, sites: int = 5) -> str:
    lines = [header, "",
             "| model | batch | method | prefill ops added | prefill syncs added | decode ops added/step | "
             "decode syncs added/step | prefill ms pruned / unpruned | vtprune's own ms / prefill | refused / error |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ms = "-" if r.get("prefill_ms_pruned") is None else f"{r['prefill_ms_pruned']:.1f} / {r['prefill_ms_unpruned']:.1f}"
        own = "-" if r.get("vtprune_ms") is None else f"{r['vtprune_ms']:.2f}"
        lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | {_num(r.get('prefill_ops_added'))} | "
                     f"{_num(r.get('prefill_syncs_added'))} | {_num(r.get('decode_ops_added_per_step'))} | "
                     f"{_num(r.get('decode_syncs_added_per_step'))} | {ms} | {own} | {_reason(r)} |")
    measured = [r for r in rows if r.get("prefill_ops_added") is not None]
    refused = sum(r["refused"] is not None for r in rows)
    errors = sum(r["error"] is not None for r in rows)
    lines += ["", f"{len(measured)} measured, {refused} refused, {errors} errors; "
              f"{sum(r['prefill_syncs_added'] == 0 for r in measured)} with no vtprune sync in the prefill, "
              f"{sum(r['decode_syncs_added_per_step'] == 0 for r in measured)} with none per decode step."]
    if sites:
        lines += ["", f"## Where vtprune's syncs are (top {sites} sites per row, batch 1 rows)", ""]
        for r in measured:
            if r["batch"] != 1 or not (r["prefill_sync_sites"] or r["decode_sync_sites"]):
                continue
            lines.append(f"- **{r['model']} {r['method']}**")
            for phase in ("prefill", "decode"):
                top = list(r[f"{phase}_sync_sites"].items())[:sites]
                if top:
                    lines.append(f"  - {phase}: " + "; ".join(f"{n}x `{s}`" for s, n in top))
    return "\n".join(lines) + "\n"


def _versions() -> str:
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[1], timeout=10).stdout.strip()
    except Exception:
        commit = ""
    return (f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"vtprune {vtprune.__version__}{f' (git {commit}, working tree)' if commit else ''}, "
            f"{torch.get_num_threads()} torch threads, {platform.machine()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(ALL_MODELS)}")
    p.add_argument("--methods", default="all", help="comma-separated preset strings, or 'all' (default)")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--keep", default=str(KEEP), help="tokens per image (int) or fraction (float); default 0.25")
    p.add_argument("--decode-steps", type=int, default=2, help="decode steps after the prefill (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed prefills each way (median; default 3)")
    p.add_argument("--no-timing", action="store_true", help="counts only")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--sites", type=int, default=5, help="sync sites listed per batch-1 row (0: none)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead.md"),
                   help="markdown output (JSON beside it); default benchmarks/results/overhead.md")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    keep: int | float = float(args.keep) if "." in args.keep else int(args.keep)
    models = [m for m in args.models.split(",") if m]
    methods = method_strings() if args.methods == "all" else [m for m in args.methods.split(",") if m]
    batches = [int(b) for b in args.batch.split(",") if b]
    rows = []
    t_start = time.perf_counter()
    for kind in models:
        for b in batches:
            for method in methods:
                t0 = time.perf_counter()
                row = measure(kind, method, b, keep=keep, decode_steps=args.decode_steps, repeats=args.repeats,
                              timing=not args.no_timing)
                rows.append(row)
                status = row["refused"] and "refused" or row["error"] and f"ERROR {row['error'][:100]}" or (
                    f"prefill +{row['prefill_ops_added']} ops +{row['prefill_syncs_added']} syncs, "
                    f"decode +{row['decode_ops_added_per_step']:g} ops +{row['decode_syncs_added_per_step']:g} syncs")
                print(f"{kind:10s} b{b} {method:16s} {status}  ({time.perf_counter() - t0:.1f}s)", flush=True)
    command = " ".join(["python", *sys.argv]) if argv is None else " ".join(["python benchmarks/overhead.py", *argv])
    header = "\n".join([
        "# vtprune overhead: ops and would-be host syncs it adds (tiny random models, CPU)", "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {_versions()}  ",
        f"keep={keep}, decode steps={args.decode_steps}, prefill timing: median of {args.repeats} "
        f"(total run {time.perf_counter() - t_start:.0f} s)  ",
        "Added = attributed to vtprune's code (`vtprune.eval.opcount`); a sync = what would make the host wait on "
        "a GPU (`.item()`/`bool()`/`int()`, `nonzero`, bool-mask indexing, `unique`, `.tolist()`, `.cpu()`, ...).",
    ])
    md = markdown(rows, header, sites=args.sites)
    print()
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    args.out.with_suffix(".json").write_text(json.dumps(dict(command=command, versions=_versions(), rows=rows),
                                                        indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
