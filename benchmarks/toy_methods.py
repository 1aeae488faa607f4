"""Every preset on both toy models at 7 and 16 of 64 visual tokens, measured with `vtprune eval`.

    python benchmarks/toy_methods.py [--limit 300] [--model toy-llava --model toy-qwen2vl] [--out benchmarks/results]
                                     [--method M ...]

One `vtprune eval` grid per toy (task ``toy-shapes``, greedy, 2 new tokens): every preset of
`vtprune.support.preset_strings` with its defaults at ``--keep 7 --keep 16``. Two presets need more than
a method name: ``ensemble`` gets ``members=["cls", "vtc-cls"]`` (its options must name members), and
``dyvte`` (visual-token exit: 0 tokens after its exit layer, a count is refused) runs once with
``--keep 0.5`` (any fraction below 1 means "exit"). Writes ``OUT/toy_methods.md`` (accuracy and retention per toy and budget), the cells behind it in
``OUT/toy_methods.json`` and the raw results of each grid under ``OUT/toy_methods_<model>/``. ``--method``
(repeatable) reruns only those presets and replaces their cells in an existing ``toy_methods.json`` (same
``--limit``), so adding a preset does not rerun the others; its raw results go to
``OUT/toy_methods_<model>_rerun/``, leaving the full grid's in place; ``--model`` likewise reruns one toy and keeps
the other's stored cells (a retrained toy-llava does not rerun toy-qwen2vl's 25 min).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_quality import evaluate  # noqa: E402

KEEPS = (7, 16)
EXITS = ("dyvte",)  # run at their default budget (an exit keeps none)
ENSEMBLE_MEMBERS = '["cls", "vtc-cls"]'  # two pre-LLM members (members must share a stage)
TOYS = ("toy-llava", "toy-qwen2vl")  # the default models, and the report's column order
# the published record these toys should rank like: average accuracy retention (%) on LLaVA-1.5-7B with 64
# of 576 visual tokens, as the methods' papers report it (FastV, SparseVLM, PyramidDrop, VTC-CLS, VisionZip
# from the comparison tables of FlowCut (Tong et al., 2025) and VScan (Zhang et al., 2025); DivPrune,
# FlowCut, CDPruner, VScan from their own papers; collected in the project's notes, anchors.md)
PUBLISHED_64 = {"fastv": 77.5, "sparsevlm": 84.6, "pyramiddrop": 86.1, "vtc-cls": 94.0, "visionzip": 94.4,
                "divprune": 95.3, "flowcut": 96.0, "cdpruner": 96.3, "vscan": 96.7}


def ranks(values: list[float]) -> list[float]:
    """1-based ranks of ``values``, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists (Pearson's on their tie-averaged ranks)."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def agreement(results: dict, model: str, keep: int = 7) -> tuple[float, list[str]] | None:
    """Spearman's correlation between a toy's accuracy at ``keep`` tokens and `PUBLISHED_64` over the
    methods measured on both, and those methods from worst to best on the toy; None when under 3."""
    acc = {c["method"]: c["accuracy"] for c in results[model]["cells"] if c["keep"] == keep}
    common = [m for m in PUBLISHED_64 if m in acc]
    if len(common) < 3:
        return None
    rho = spearman([acc[m] for m in common], [PUBLISHED_64[m] for m in common])
    return rho, sorted(common, key=lambda m: acc[m])


def refusals(model_name: str, methods: list[str]) -> dict[str, str]:
    """Preset -> the one-line reason it refuses the toy ``model_name`` (as ``vtprune eval`` would at start),
    for the presets of ``methods`` that do."""
    import vtprune
    from vtprune.loading import load_model
    from vtprune.support import EXAMPLE_OPTIONS

    model, _ = load_model(model_name)
    out = {}
    for method in methods:
        try:
            vtprune.apply(model, method=method, **EXAMPLE_OPTIONS.get(method, {}))
        except (vtprune.ConfigError, vtprune.UnsupportedModelError) as err:
            out[method] = str(err).splitlines()[0].replace(f"{Path(vtprune.__file__).parent.parent}/", "")
        finally:
            if getattr(model, "_vtprune_state", None) is not None:
                vtprune.remove(model)
    return out


def main(argv: list[str] | None = None) -> int:
    from vtprune.support import preset_strings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=None, help="default: toy-llava and toy-qwen2vl")
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--method", action="append", default=None, help="rerun only these presets (default: all)")
    ap.add_argument("--report", action="store_true", help="only rewrite toy_methods.md from toy_methods.json")
    args = ap.parse_args(argv)
    models = args.model or list(TOYS)
    presets = preset_strings()
    unknown = sorted(set(args.method or []) - set(presets))
    if unknown:
        ap.error(f"unknown preset(s) {unknown}; `vtprune methods` lists them")
    chosen = args.method or presets
    methods = [m for m in chosen if m not in EXITS]
    exit_methods = [m for m in chosen if m in EXITS]
    out = Path(args.out)
    store = out / "toy_methods.json"
    # a partial rerun (some presets, or some models) updates the stored results in place
    saved = json.loads(store.read_text()) if (args.method or args.report or args.model) and store.exists() else {}
    if args.report:
        if not saved:
            ap.error(f"--report needs {store}: run the benchmark first")
        args.limit = saved["limit"]
    if saved and saved.get("limit") != args.limit:
        ap.error(f"{store} was measured with --limit {saved.get('limit')}; rerun everything or pass that limit")
    results: dict[str, dict] = saved.get("models", {})
    for model in [] if args.report else models:
        t0 = time.perf_counter()
        common = ["--model", model, "--task", "toy-shapes", "--limit", str(args.limit), "--batch-size",
                  str(args.batch_size), "--max-new-tokens", "2"]
        cells = [c for c in results.get(model, {}).get("cells", []) if c["method"] not in chosen]
        refused = {**{m: r for m, r in results.get(model, {}).get("refused", {}).items() if m not in chosen},
                   **refusals(model, chosen)}
        runs = [m for m in methods if m not in refused]
        base = results.get(model, {}).get("baseline")
        # a --method rerun keeps the full grid's raw results and writes its own beside them
        raw = f"toy_methods_{model}" + ("_rerun" if args.method else "")
        if runs:
            grid = evaluate([*common, *sum((["--keep", str(k)] for k in KEEPS), []),
                             *sum((["--method", m] for m in runs), []),
                             *(["--option", f"members={ENSEMBLE_MEMBERS}"] if "ensemble" in runs else []),
                             "--out", str(out / raw)])
            cells += grid["cells"]
            base = grid["baseline"]["accuracy"]
        exit_runs = [m for m in exit_methods if m not in refused]
        if exit_runs:
            exits = evaluate([*common, "--keep", "0.5", *sum((["--method", m] for m in exit_runs), []),
                              "--out", str(out / f"{raw}_exit")])
            cells += [{**c, "keep": k} for c in exits["cells"] for k in KEEPS]  # an exit: the same cell at each
            base = exits["baseline"]["accuracy"]
        kept_old = any(c["method"] not in chosen for c in results.get(model, {}).get("cells", []))
        seconds = time.perf_counter() - t0 + (results.get(model, {}).get("seconds", 0.0) if kept_old else 0.0)
        results[model] = {"cells": cells, "baseline": base, "seconds": seconds, "refused": refused}
        print(f"{model}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        store.write_text(json.dumps({"limit": args.limit, "models": results}, indent=1))

    # the report covers every model measured, stored ones too
    models = [m for m in TOYS if m in results] + sorted(m for m in results if m not in TOYS)
    header = "| method | " + " | ".join(f"{m} @{k}" for m in models for k in KEEPS) + " |"
    lines = ["# Every preset on the toy models", "",
             f"`python benchmarks/toy_methods.py --limit {args.limit}` ({args.limit} toy-shapes test samples per toy; "
             "accuracy, retention = accuracy / unpruned, at 7 and 16 of 64 visual tokens per image; each preset "
             "with its defaults, `ensemble` with members cls + vtc-cls; `dyvte` keeps 0 visual tokens after its "
             "exit, shown in both columns; \"n kept\": the mean count of a method that chooses it, `prumerge`'s "
             "adaptive one capped by the budget)", "",
             header, "|---|" + "---:|" * (len(models) * len(KEEPS))]
    base = {m: results[m]["baseline"] for m in models}
    lines.append("| unpruned (64) | " + " | ".join(f"{base[m]:.1%}" for m in models for _ in KEEPS) + " |")
    for method in presets:
        cells = []
        for m in models:
            for k in KEEPS:
                found = [c for c in results[m]["cells"] if c["method"] == method and c["keep"] == k]
                if method in results[m].get("refused", {}):
                    cells.append("refused")
                    continue
                if not found:
                    cells.append("-")
                    continue
                c = found[0]
                if c.get("failed"):
                    cells.append(f"failed {c['failed']}")
                    continue
                text = f"{c['accuracy']:.1%} ({c['accuracy'] / base[m]:.0%})" if base[m] else f"{c['accuracy']:.1%}"
                kept = c.get("visual_tokens")
                if method not in EXITS and kept is not None and abs(kept - k) > 0.05:  # an adaptive count
                    text += f", {kept:.1f} kept"
                cells.append(text)
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    reasons = sorted({(m, r) for res in results.values() for m, r in res.get("refused", {}).items()})
    if reasons:
        lines += ["", "Refused (the reason `vtprune.apply` gives on that toy):", ""]
        lines += [f"- `{m}` on {', '.join(n for n in models if results[n].get('refused', {}).get(m) == r)}: {r}"
                  for m, r in reasons]
    lines += ["", "Ranking against the published record (average retention on LLaVA-1.5-7B at 64 of 576 tokens: "
              + ", ".join(f"{m} {v}" for m, v in PUBLISHED_64.items()) + "): Spearman's rank correlation with each "
              "toy's accuracy at 7 of 64 tokens, over those methods:", ""]
    for m in models:
        found = agreement(results, m)
        if found is not None:
            lines.append(f"- {m}: rho = {found[0]:+.2f} (worst to best on the toy: {', '.join(found[1])})")
    lines += ["", "Time (2-core CPU, summed over the runs that measured these cells): " + ", ".join(f"{m} {results[m]['seconds']:.0f} s" for m in models) + "."]
    text = "\n".join(lines) + "\n"
    (out / "toy_methods.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
