"""What `vtprune eval` writes: results.json, the markdown table, and the accuracy-vs-tokens plot."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

from vtprune.eval.runner import CellRun
from vtprune.eval.tasks import Task

RESULTS_FILE = "results.json"
PLOT_FILE = "accuracy_vs_tokens.png"
SCHEMA = 1


def versions() -> dict[str, str]:
    import torch
    import transformers

    import vtprune

    return {"vtprune": vtprune.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def sample_log(run: CellRun, task: Task) -> list[dict[str, Any]]:
    """Every prediction of one cell, in task order (``--log-samples``)."""
    out = []
    for s in task.samples:
        r = run.records[s.index]
        entry: dict[str, Any] = {"index": s.index}
        if s.id is not None:
            entry["id"] = s.id
        if s.line is not None:
            entry["line"] = s.line
        entry.update(question=s.question, answer=s.answer, type=s.qtype, metric=s.metric)
        if s.choices:
            entry.update(choices=s.choices, answer_index=s.answer_index)
        entry.update(prediction=r.prediction, correct=r.correct, kept=r.kept, visual_tokens=r.visual_before)
        if r.kept_indices is not None:
            entry["kept_indices"] = r.kept_indices
        if r.recall_question is not None:
            entry.update(recall_question=r.recall_question, recall_objects=r.recall_objects)
        if r.error is not None:
            entry["error"] = r.error
        out.append(entry)
    return out


def build_results(runs: list[CellRun], task: Task, *, config: dict[str, Any], model_info: dict[str, Any],
                  memory_measure: str, log_samples: bool = False) -> dict[str, Any]:
    """The results document: config, versions, model, task, the baseline and the cells' metrics."""
    base_run, cell_runs = runs[0], runs[1:]
    baseline = base_run.metrics(task)
    cells = [r.metrics(task, baseline["accuracy"]) for r in cell_runs]
    if log_samples:
        baseline["predictions"] = sample_log(base_run, task)
        for c, r in zip(cells, cell_runs):
            c["predictions"] = sample_log(r, task)
    errors = {}
    for r in runs:
        for rec in r.records.values():
            if rec.error is not None:
                errors.setdefault(rec.index, rec.error)
    return {
        "schema": SCHEMA,
        "config": config,
        "versions": versions(),
        "model": model_info,
        "task": {"name": task.name, "samples": len(task.samples), **task.info},
        "memory_measure": memory_measure,
        "baseline": baseline,
        "cells": cells,
        "failed_samples": [{"index": i, "error": e} for i, e in sorted(errors.items())],
    }


def write_results(results: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_FILE
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def markdown_table(results: dict[str, Any]) -> str:
    """One row per cell, the unpruned baseline first."""
    rows = [results["baseline"], *results["cells"]]
    recall = any(r.get("recall_question") is not None for r in rows)  # toy tasks: relevant-token recall
    head = ["method", "keep", "where", "visual tokens", "accuracy", "retention",
            *(["recall (question)", "recall (objects)"] if recall else []),
            "prefill ms", "end-to-end ms", "prefill GFLOPs", "peak MiB", "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for row in rows:
        keep = "-" if row["keep"] is None else str(row["keep"])
        cells = [row["method"], keep, row["where"], _fmt(row["visual_tokens"], ".1f"),
                 _fmt(row["accuracy"], ".1%"), _fmt(row["retention"], ".1%"),
                 *([_fmt(row.get("recall_question"), ".1%"), _fmt(row.get("recall_objects"), ".1%")] if recall else []),
                 _fmt(row["prefill_ms"], ".1f"),
                 _fmt(row["e2e_ms"], ".1f"), _fmt(row["prefill_gflops"], ".3g"), _fmt(row["peak_memory_mib"], ".1f"),
                 str(row["failed"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_line(results: dict[str, Any]) -> str:
    cfg, model, task = results["config"], results["model"], results["task"]
    chance = f", chance {task['chance_accuracy']:.1%}" if "chance_accuracy" in task else ""
    return (f"model {model['name']} ({model['class']}, {model['device']} {model['dtype']}) | task {task['name']} "
            f"({task['samples']} samples{chance}) | batch {cfg['batch_size']} | max new tokens "
            f"{cfg['max_new_tokens']} | latencies: medians over batches | memory: {results['memory_measure']}")


def plot(results: dict[str, Any], path: Path) -> Path:
    """Accuracy against mean visual tokens kept, one line per method, the unpruned accuracy as a
    horizontal reference (and chance, when the task knows it). Needs matplotlib (``vtprune[eval]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    base = results["baseline"]
    by_method: dict[str, list[tuple[float, float]]] = {}
    for c in results["cells"]:
        if c["visual_tokens"] is not None:
            by_method.setdefault(c["method"], []).append((c["visual_tokens"], c["accuracy"]))
    for method, pts in by_method.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    label = "unpruned"
    if base["visual_tokens"] is not None:
        label += f" ({base['visual_tokens']:.0f} tokens)"
        ax.plot([base["visual_tokens"]], [base["accuracy"]], marker="*", color="black", markersize=10)
    ax.axhline(base["accuracy"], color="black", linestyle="--", linewidth=1, label=label)
    chance = results["task"].get("chance_accuracy")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("visual tokens kept (mean per sample)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{results['model']['name']} on {results['task']['name']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
