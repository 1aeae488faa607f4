"""Collect ``benchmarks/results/parity/*.json`` into ``benchmarks/results/parity.md``.

    python benchmarks/parity/report.py [--results benchmarks/results/parity] [--out benchmarks/results/parity.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--out", default=str(RESULTS.parent / "parity.md"))
    args = ap.parse_args(argv)
    files = sorted(Path(args.results).glob("*.json"))
    lines = ["# Parity with the methods' released code", "",
             "Each row: the same tiny model and inputs through vtprune and through the release's own functions "
             "(imported from a checkout outside this repository); Jaccard of the kept visual-token sets (1 = the same "
             "tokens) and, where the release's output reaches the LLM, the largest absolute difference of the "
             "first-token logits. `random` = random weights, `peaked` = vision attention made peaked so that "
             "scores are well separated.", ""]
    for f in files:
        data = json.loads(f.read_text())
        commit = (data.get("reference_commit") or "the commit its docstring names")[:40]
        lines += [f"## `{data['method']}`", "", f"Command: `{data['command']}` (reference {data['reference']} at "
                  f"{commit})", "",
                  "| model | variant | budget | Jaccard | kept sets equal | max abs logit diff | max abs merged-feature "
                  "diff | note |", "|---|---|---:|---:|---|---:|---:|---|"]
        for r in data["rows"]:
            logit, feat = r.get("logit_max_abs"), r.get("feature_max_abs")
            note = " ".join(str(r.get("note") or "").split())
            lines.append(f"| {r['model']} | {r['variant']} | {r['budget']} | {r['jaccard']:.3f} | "
                         f"{'yes' if r.get('kept_equal') else 'no'} | {'-' if logit is None else f'{logit:.2e}'} | "
                         f"{'-' if feat is None else f'{feat:.2e}'} | {note or '-'} |")
        lines.append("")
    if not files:
        lines.append("No parity results yet: run `python benchmarks/parity/<method>.py --ref PATH`.")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
