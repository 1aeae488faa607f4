"""The toy models' quality bar, measured with `vtprune eval` and checked.

    python benchmarks/toy_quality.py --model toy-llava [--limit 300] [--out benchmarks/results]

Two evaluations of the model on the toy-shapes test split, each through the `vtprune eval` command:

1. ``toy-shapes``: unpruned, then the eval-only ``oracle`` (keeps the question's object cells) and every
   ``--method`` at 1/9 of the visual tokens (7 of the 64 that both toys have at 224 px: LLaVA's 28 px
   patches, Qwen2-VL's merged 2 x 2 groups of 14 px patches);
2. ``toy-shapes-noise``: the same questions with the images replaced by noise (unpruned);
3. ``toy-shapes-crowded`` (unless ``--no-crowded``): 4-6 objects per image, no count questions, the same
   methods and ``oracle`` at 1/9, where not every object cell fits: reported beside toy-shapes with
   relevant-token recall, not part of the bar's checks.

and the four checks of the bar (a toy that ranks pruners for the right reasons): unpruned accuracy >= 97 %;
noise accuracy within 10 points of chance (the model looks); the oracle at 1/9 keeps >= 95 % of the
unpruned accuracy (the model copes with few visual tokens, when they are the right ones); random at 1/9
keeps <= 60 % of it (the task needs the question's objects). Prints a markdown report (also written to
``OUT/toy_quality_<model>.md``) and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

DEFAULT_METHODS = ("random", "cls", "vtc-cls", "visionzip", "fastv", "debias+fastv", "flowcut")
TOKENS = {"toy-llava": 64, "toy-qwen2vl": 64}


def evaluate(argv: list[str]) -> dict:
    """Run ``vtprune eval argv --json`` in this process and return its results."""
    from vtprune.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["eval", *argv, "--json"])
    if code:
        raise SystemExit(f"vtprune eval {' '.join(argv)} exited with {code}")
    return json.loads(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-llava", help="toy-llava, toy-qwen2vl or a checkpoint directory")
    ap.add_argument("--method", action="append", default=None, help=f"default: {', '.join(DEFAULT_METHODS)}")
    ap.add_argument("--tokens", type=int, default=None, help="visual tokens per image unpruned (default: by model)")
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--no-crowded", action="store_true", help="skip the toy-shapes-crowded report")
    args = ap.parse_args(argv)
    methods = args.method or list(DEFAULT_METHODS)
    tokens = args.tokens or TOKENS.get(args.model)
    if tokens is None:
        ap.error("--tokens is needed for a model other than toy-llava / toy-qwen2vl")
    keep = tokens // 9
    out = Path(args.out)
    common = ["--model", args.model, "--limit", str(args.limit), "--batch-size", str(args.batch_size),
              "--max-new-tokens", "2"]
    pruned = evaluate([*common, "--task", "toy-shapes", "--keep", str(keep),
                       *sum((["--method", m] for m in ["oracle", *methods]), []),
                       "--out", str(out / f"toy_quality_{Path(args.model).name}")])
    noise = evaluate([*common, "--task", "toy-shapes-noise", "--keep", str(keep), "--method", "random",
                      "--out", str(out / f"toy_quality_{Path(args.model).name}_noise")])
    crowded = None if args.no_crowded else evaluate(
        [*common, "--task", "toy-shapes-crowded", "--keep", str(keep), "--method", "oracle",
         *sum((["--method", m] for m in methods), []), "--out", str(out / f"toy_quality_{Path(args.model).name}_crowded")])

    base = pruned["baseline"]["accuracy"]
    chance = pruned["task"]["chance_accuracy"]
    cells = {c["method"]: c for c in pruned["cells"]}
    oracle = cells["oracle"]["accuracy"]
    checks = [
        ("unpruned accuracy >= 97%", f"{base:.1%}", base >= 0.97),
        ("noise-image accuracy within 10 points of chance", f"{noise['baseline']['accuracy']:.1%} (chance {chance:.1%})",
         abs(noise["baseline"]["accuracy"] - chance) <= 0.10),
        (f"oracle at 1/9 ({keep} tokens) keeps >= 95% of unpruned", f"{oracle:.1%} ({oracle / base:.1%} retained)",
         oracle >= 0.95 * base),
    ]
    if "random" in cells:
        rand = cells["random"]["accuracy"]
        checks.append((f"random at 1/9 ({keep} tokens) keeps <= 60% of unpruned", f"{rand:.1%} ({rand / base:.1%} retained)",
                       rand <= 0.60 * base))
    lines = [f"# Toy quality bar: {args.model}", "",
             f"`python benchmarks/toy_quality.py --model {args.model} --limit {args.limit}"
             + (f" --tokens {args.tokens}" if args.tokens else "") + "` "
             f"({args.limit} test samples, keep {keep} of {tokens} visual tokens)", "",
             "| check | measured | pass |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if ok else 'NO'} |" for name, value, ok in checks]
    lines += ["", "| method | accuracy | retention | visual tokens | " + " | ".join(sorted(pruned["baseline"]["accuracy_by_type"])) + " |",
              "|---|---:|---:|---:|" + "---:|" * len(pruned["baseline"]["accuracy_by_type"])]
    rows = [("unpruned", pruned["baseline"])] + [(m, cells[m]) for m in ["oracle", *methods] if m in cells]
    rows.append(("unpruned, noise images", noise["baseline"]))
    for name, c in rows:
        by = c["accuracy_by_type"]
        ret = c.get("retention")
        lines.append(f"| {name} | {c['accuracy']:.1%} | {'-' if ret is None else f'{ret:.1%}'} | {c['visual_tokens']:.1f} | "
                     + " | ".join(f"{by[k]:.0%}" for k in sorted(by)) + " |")
    if crowded is not None:
        ccells = {c["method"]: c for c in crowded["cells"]}
        types = sorted(crowded["baseline"]["accuracy_by_type"])
        lines += ["", f"**toy-shapes-crowded** ({args.limit} samples, 4-6 objects, no count questions, chance "
                  f"{crowded['task']['chance_accuracy']:.1%}; keep {keep}; recall: the share of the question's "
                  "object cells / of all object cells the kept tokens cover):", "",
                  "| method | accuracy | retention | recall (question) | recall (objects) | " + " | ".join(types) + " |",
                  "|---|---:|---:|---:|---:|" + "---:|" * len(types)]
        for name, c in [("unpruned", crowded["baseline"])] + [(m, ccells[m]) for m in ["oracle", *methods] if m in ccells]:
            by, ret = c["accuracy_by_type"], c.get("retention")
            rq, ro = c.get("recall_question"), c.get("recall_objects")
            lines.append(f"| {name} | {c['accuracy']:.1%} | {'-' if ret is None else f'{ret:.1%}'} | "
                         f"{'-' if rq is None else f'{rq:.1%}'} | {'-' if ro is None else f'{ro:.1%}'} | "
                         + " | ".join(f"{by[k]:.0%}" for k in types) + " |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"toy_quality_{Path(args.model).name}.md").write_text(text)
    print(text)
    return 0 if all(ok for _, _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
