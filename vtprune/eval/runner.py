"""The evaluation grid: one unpruned baseline and every (method, keep) cell, run on the same batches.

The loop runs batch by batch, and every cell (the baseline first) on each batch, so all cells see
exactly the same padded inputs, built once per batch (left padding, the generation convention). Per
cell and batch it times one prefill forward (``logits_to_keep=1``) and one greedy ``generate()``,
measures the peak memory of both (`vtprune.eval.memory`), and records each sample's prediction,
score, visual tokens kept (`vtprune.stats`; unpruned: the visual tokens of its prompt) and FLOPs
estimate (`vtprune.eval.flops`).

Failures stay local: an image that cannot be read fails its sample in every cell; a batch that raises
is retried one sample at a time, so only the samples that fail themselves are lost (they count as
wrong and are reported, with their error). Configuration errors (unknown method, bad keep or layer)
are raised by `validate_cells` before anything runs.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import vtprune
from vtprune.eval.distributed import Shard
from vtprune.eval.flops import image_geometry, llm_flops, vision_flops
from vtprune.eval.memory import PeakMemory
from vtprune.eval.oracle import EVAL_ONLY
from vtprune.eval.recall import cell_recall
from vtprune.eval.tasks import EvalSample, Task
from vtprune.loading import placeholder_in


@dataclass
class Cell:
    """One setting of the grid: ``method=None`` is the unpruned baseline."""

    method: str | None = None
    keep: int | float | None = None
    layer: int | None = None  # the requested in-LLM layer (None: the method's default)
    options: dict[str, Any] = field(default_factory=dict)
    stage: str | None = None  # resolved by `validate_cells`: "pre-llm" | "llm"
    resolved_layer: int | None = None
    source: str | None = None  # the config file the cell came from (`vtprune eval --config`), if any

    @property
    def label(self) -> str:
        return "unpruned" if self.method is None else f"{self.method} keep={self.keep}"

    @property
    def where(self) -> str:
        if self.method is None:
            return "-"
        return "pre-LLM" if self.stage == "pre-llm" else f"LLM layer {self.resolved_layer}"

    def configure(self, model, samples: list[EvalSample] | None = None) -> None:
        """Patch ``model`` for this cell (or remove any patch for the baseline); an eval-only method
        (`vtprune.eval.oracle`) is built for the batch's ``samples``."""
        if self.method is None:
            vtprune.remove(model)
        elif self.method in EVAL_ONLY:
            vtprune.apply(model, EVAL_ONLY[self.method](samples or [], **self.options), keep=self.keep,
                          layer=self.layer)
        else:
            vtprune.apply(model, method=self.method, keep=self.keep, layer=self.layer, **self.options)


def _declares(method: str, option: str) -> bool:
    """Whether a component of ``method`` (``"a+b"``) declares ``option`` (``"name"`` or ``"part.name"``)."""
    from vtprune.scorers.base import registry, scorer_options

    reg = registry()
    parts = [p.strip().lower() for p in method.split("+")]
    if "." in option:
        part, name = option.split(".", 1)
        return part in parts and part in reg and name in scorer_options(reg[part])
    return any(option in scorer_options(reg[p]) for p in parts if p in reg)


def build_cells(methods: list[str], keeps: list[int | float], layer: int | None = None,
                options: dict[str, Any] | None = None) -> list[Cell]:
    """The (method, keep) grid, methods outermost.

    ``layer`` goes to the methods that can prune inside the LLM; pre-LLM-only methods (cls, vtc-cls,
    visionzip, ...) keep their own pruning point. Each option goes to the methods that declare it
    (``seed`` to ``random`` and not to ``fastv``). Raises `ConfigError` for an unknown method, or an
    option that none of the methods declares.
    """
    from vtprune.config import ConfigError
    from vtprune.scorers import IN_LLM, build_scorer

    options = dict(options or {})
    for key in options:
        if not any(_declares(m, key) for m in methods):
            for m in methods:
                if m not in EVAL_ONLY:
                    build_scorer(m, {})  # an unknown method is the better message
            hint = ("the in-LLM pruning layer is `--layer K` (`layer=` in Python)" if key == "layer"
                    else "see the README's method table for their options")
            raise ConfigError(f"option {key!r} belongs to none of the methods {', '.join(methods)}; {hint}")
    cells = []
    for method in methods:
        own = {k: v for k, v in options.items() if _declares(method, k)}
        stages = EVAL_ONLY[method]([]).stages if method in EVAL_ONLY else build_scorer(method, own).stages
        cell_layer = layer if layer is not None and IN_LLM in stages else None
        cells.extend(Cell(method, keep, cell_layer, dict(own)) for keep in keeps)
    return cells


def validate_cells(model, cells: list[Cell]) -> None:
    """Apply each cell's configuration once (raising `ConfigError` / `UnsupportedModelError` early) and
    record where it prunes."""
    for cell in cells:
        if cell.method is None:
            continue
        cell.configure(model)
        state = model._vtprune_state
        cell.stage, cell.resolved_layer = state.stage, state.layer
    vtprune.remove(model)


@dataclass
class SampleRecord:
    """One sample's outcome in one cell."""

    index: int
    prediction: str | None = None
    correct: bool = False
    visual_before: int | None = None  # visual tokens of the prompt
    kept: int | None = None  # visual tokens kept
    flops: float | None = None  # prefill FLOPs estimate (LLM + vision tower)
    vision_flops: float | None = None
    error: str | None = None
    kept_indices: list[int] | None = None  # indices into the sample's visual tokens (pruned cells)
    recall_question: float | None = None  # toy tasks: share of the question's object cells kept
    recall_objects: float | None = None  # ... and of all object cells (`vtprune.eval.recall`)


@dataclass
class CellRun:
    """Everything measured for one cell: per-sample records and per-batch timings and memory."""

    cell: Cell
    records: dict[int, SampleRecord] = field(default_factory=dict)
    prefill_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    memory_mib: list[float] = field(default_factory=list)

    def metrics(self, task: Task, baseline_accuracy: float | None = None) -> dict[str, Any]:
        """The cell's row: accuracy over all samples (a failed sample counts as wrong), retention
        (accuracy / unpruned accuracy; 1 for the baseline, None when the unpruned accuracy is 0), mean
        visual tokens and FLOPs per scored sample, median latencies over batches, peak memory."""
        n = len(task.samples)
        recs = [self.records[s.index] for s in task.samples]
        ok = [r for r in recs if r.error is None]
        correct = sum(r.correct for r in recs)
        accuracy = correct / n if n else 0.0
        if self.cell.method is None:
            retention = 1.0
        else:
            retention = accuracy / baseline_accuracy if baseline_accuracy else None
        by_type: dict[str, list[bool]] = {}
        for s, r in zip(task.samples, recs):
            by_type.setdefault(s.qtype, []).append(r.correct)

        def mean(values):
            values = [v for v in values if v is not None]
            return sum(values) / len(values) if values else None

        def median_ms(values):
            return statistics.median(values) * 1e3 if values else None

        flops, vision = mean(r.flops for r in ok), mean(r.vision_flops for r in ok)
        return {
            "method": (self.cell.method or "unpruned") + (f" ({self.cell.source})" if self.cell.source else ""),
            "keep": self.cell.keep,
            "layer": self.cell.layer,
            "stage": self.cell.stage,
            "pruning_layer": self.cell.resolved_layer,
            "where": self.cell.where,
            "options": self.cell.options,
            "samples": n,
            "correct": correct,
            "failed": n - len(ok),
            "accuracy": accuracy,
            "retention": retention,
            "accuracy_by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
            "visual_tokens": mean(r.kept for r in ok),
            "recall_question": mean(r.recall_question for r in ok),
            "recall_objects": mean(r.recall_objects for r in ok),
            "visual_tokens_before": mean(r.visual_before for r in ok),
            "prefill_ms": median_ms(self.prefill_s),
            "e2e_ms": median_ms(self.e2e_s),
            "timed_batches": len(self.prefill_s),
            "prefill_gflops": flops / 1e9 if flops is not None else None,
            "vision_gflops": vision / 1e9 if vision is not None else None,
            "peak_memory_mib": max(self.memory_mib) if self.memory_mib else None,
        }


def merge_runs(parts: list[list[CellRun]]) -> list[CellRun]:
    """One list of runs from every rank's (same cells, disjoint samples): records joined, timings and
    memory readings pooled (medians and maxima are then taken over all ranks' batches)."""
    merged = parts[0]
    for part in parts[1:]:
        for into, run in zip(merged, part):
            into.records.update(run.records)
            into.prefill_s += run.prefill_s
            into.e2e_s += run.e2e_s
            into.memory_mib += run.memory_mib
    return merged


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


class Runner:
    """Runs a task on a model for a list of cells (the baseline is added first)."""

    def __init__(self, model, processor, prompt: Callable[[EvalSample], str], *, batch_size: int = 1,
                 max_new_tokens: int = 4, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 progress: bool | None = None):
        from vtprune.adapters import adapter_for

        self.model, self.processor, self.prompt = model, processor, prompt
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.device, self.dtype, self.progress = torch.device(device), dtype, progress
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.visual_ids = adapter_for(model).visual_token_ids()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    # ---- inputs ---------------------------------------------------------------------------------
    def _inputs(self, samples: list[EvalSample], images: list[Any]):
        self.tokenizer.padding_side = "left"
        inputs = self.processor(images=images, text=[self.prompt(s) for s in samples], return_tensors="pt",
                                padding=True)
        return inputs.to(device=self.device, dtype=self.dtype) if self.dtype else inputs.to(self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- one cell on one batch ------------------------------------------------------------------
    def _run_batch(self, samples: list[EvalSample], inputs) -> tuple[list[SampleRecord], float, float, float | None]:
        with torch.inference_mode(), PeakMemory(self.device) as mem:
            t0 = time.perf_counter()
            self.model(**inputs, logits_to_keep=1)
            self._sync()
            t1 = time.perf_counter()
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.pad_id)
            self._sync()
            t2 = time.perf_counter()
        st = vtprune.stats(self.model)
        n_in = inputs["input_ids"].shape[1]
        texts = self.tokenizer.batch_decode(out[:, n_in:], skip_special_tokens=True)
        ids = inputs["input_ids"]
        visual = torch.zeros_like(ids, dtype=torch.bool)
        for t in self.visual_ids:
            visual |= ids == t
        mask = inputs.get("attention_mask")
        lengths = mask.sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])
        geometry = image_geometry(self.model.config, inputs)
        records = []
        for b, s in enumerate(samples):
            pred = texts[b].strip()
            rec = SampleRecord(s.index, prediction=pred, correct=bool(s.score(pred)),
                               visual_before=int(visual[b].sum()))
            if st is None:  # unpruned
                rec.kept = rec.visual_before
                llm = llm_flops(self.model.config, int(lengths[b]))
            else:
                rec.kept = int(st.visual_after[b])
                rec.kept_indices = st.kept[b].tolist()
                llm = llm_flops(self.model.config, st.seq_len_before[b], st.seq_len_after[b], st.stage, st.layer)
            if s.cell_grid is not None:
                kept = rec.kept_indices if rec.kept_indices is not None else range(rec.visual_before)
                rec.recall_question = cell_recall(kept, rec.visual_before, s.question_cells or [], s.cell_grid)
                rec.recall_objects = cell_recall(kept, rec.visual_before, s.object_cells or [], s.cell_grid)
            vis = vision_flops(self.model.config, geometry[b]) if geometry is not None else None
            rec.vision_flops, rec.flops = vis, llm + (vis or 0.0)
            records.append(rec)
        return records, t1 - t0, t2 - t1, mem.mib

    def _run_cell(self, run: CellRun, samples: list[EvalSample], images: list[Any], inputs,
                  timed: bool = True) -> None:
        try:
            run.cell.configure(self.model, samples)
            records, prefill, e2e, mib = self._run_batch(samples, inputs)
        except Exception:  # retry one by one: only the samples that fail themselves are lost
            for s, im in zip(samples, images):
                try:
                    run.cell.configure(self.model, [s])
                    records, _, _, _ = self._run_batch([s], self._inputs([s], [im]))
                    run.records[s.index] = records[0]
                except Exception as err:
                    run.records[s.index] = SampleRecord(s.index, error=_error_text(err))
            return
        for rec in records:
            run.records[rec.index] = rec
        if not timed:
            return
        run.prefill_s.append(prefill)
        run.e2e_s.append(e2e)
        if mib is not None:
            run.memory_mib.append(mib)

    def _warm_up(self, runs: list[CellRun], samples: list[EvalSample], inputs) -> None:
        """One untimed prefill per cell on the first batch (first-call costs: allocator, kernels)."""
        for run in runs:
            try:
                run.cell.configure(self.model, samples)
                with torch.inference_mode():
                    self.model(**inputs, logits_to_keep=1)
            except Exception:  # the timed run records the failure
                pass

    # ---- the grid -------------------------------------------------------------------------------
    def run(self, task: Task, cells: list[Cell], shard: Shard | None = None) -> list[CellRun]:
        """Run the baseline and ``cells`` on every batch of ``task`` (with ``shard``: on this rank's share
        of the batches, see `vtprune.eval.distributed`); returns the baseline's run first."""
        from tqdm.auto import tqdm

        shard = shard or Shard()
        runs = [CellRun(Cell())] + [CellRun(c) for c in cells]
        batches = [task.samples[i:i + self.batch_size] for i in range(0, len(task.samples), self.batch_size)]
        batches = shard.batches(batches)
        desc = "vtprune eval" if shard.world == 1 else f"vtprune eval (rank 0 of {shard.world})"
        bar = tqdm(total=sum(len(b) for b in batches), desc=desc, unit="sample", file=sys.stderr,
                   disable=not shard.main or (None if self.progress is None else not self.progress))
        warm = False
        try:
            for batch in batches:
                samples, images = [], []
                for s in batch:
                    placeholder = placeholder_in(self.model, self.processor, s.prompt_text())
                    if placeholder is not None:  # the processor would refuse the batch with a token-count error
                        for run in runs:
                            run.records[s.index] = SampleRecord(s.index, error=(
                                f"question: contains {placeholder}, the model's image placeholder (the prompt "
                                "template places the image itself): remove it from the task's question"))
                        continue
                    try:
                        images.append(s.load_image())
                        samples.append(s)
                    except Exception as err:
                        for run in runs:
                            run.records[s.index] = SampleRecord(s.index, error=f"image: {_error_text(err)}")
                if samples:
                    try:
                        inputs = self._inputs(samples, images)
                    except Exception:
                        inputs = None
                    if inputs is not None and not warm:
                        self._warm_up(runs, samples, inputs)
                        warm = True
                    for run in runs:
                        if inputs is None:  # the processor failed on the batch: go sample by sample
                            self._run_cell_singly(run, samples, images)
                        else:
                            self._run_cell(run, samples, images, inputs)
                bar.update(len(batch))
        finally:
            bar.close()
            vtprune.remove(self.model)
        return runs

    def _run_cell_singly(self, run: CellRun, samples: list[EvalSample], images: list[Any]) -> None:
        for s, im in zip(samples, images):
            try:
                inputs = self._inputs([s], [im])
            except Exception as err:
                run.records[s.index] = SampleRecord(s.index, error=f"processor: {_error_text(err)}")
                continue
            self._run_cell(run, [s], [im], inputs, timed=False)  # not the shared batch: untimed
