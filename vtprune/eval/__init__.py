"""``vtprune eval``: accuracy, tokens kept, latency, FLOPs and memory of pruning methods on a VQA task.

Modules: `tasks` (toy-shapes and jsonl tasks), `metrics` (exact match, multiple choice), `runner` (the
grid of cells on shared batches), `flops` (analytic prefill FLOPs), `memory` (peak memory), `report`
(results.json, markdown table, plot), `command` (the CLI entry). Programmatic use::

    from vtprune.eval import Runner, build_cells, load_task
    task = load_task("toy-shapes", limit=50)
    runs = Runner(model, processor, prompt_fn, batch_size=8).run(task, build_cells(["fastv"], [64]))
"""

from vtprune.eval.errors import EvalError
from vtprune.eval.runner import Cell, CellRun, Runner, build_cells, validate_cells
from vtprune.eval.tasks import EvalSample, Task, load_task

__all__ = ["Cell", "CellRun", "EvalError", "EvalSample", "Runner", "Task", "build_cells", "load_task",
           "validate_cells"]
