"""The ``vtprune eval`` command: arguments -> task, model, grid -> results.json, table, plot.

Every check that needs no model runs first (task file and images, model name, methods), so bad
input fails in seconds with ``vtprune: error: ...`` (exit status 2, raised here as `EvalError`,
`ModelNotFoundError` or `ConfigError` and printed by `vtprune.cli.main`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from vtprune.eval.errors import EvalError

DEFAULT_METHODS = ("fastv", "cls", "random")
DEFAULT_KEEPS = (64,)
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EvalError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda was given but no CUDA device is available; use --device cpu")
    return device


def resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise EvalError(f"unknown --dtype {name!r}; use auto, float32, float16 or bfloat16")
    return getattr(torch, DTYPES[name])


def load_eval_model(name: str, device, dtype):
    """The model (on ``device``, in ``dtype``, eval mode) and its processor; a checkpoint directory that
    cannot be loaded raises `EvalError`."""
    from vtprune.loading import load_model

    try:
        model, processor = load_model(name, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise EvalError(f"could not load a model and processor from {name!r} ({type(err).__name__}: {err}); "
                        "give a directory saved with save_pretrained (model and processor)") from None
    return model.to(device).eval(), processor


def config_dict(args) -> dict[str, Any]:
    """The command's arguments as JSON values (results.json ``config``)."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def save_overlays(runs, task, model, processor, where: Path) -> dict[str, Any]:
    """Write ``where/<method>-keep<keep>/<sample index>.png`` for every pruned cell and scored sample: the
    model's view of the sample's image with the pruned visual tokens darkened (`vtprune.viz`).

    Returns ``{"dir": ..., "written": n}``, or ``{"dir": None, "note": why}`` when the model's token
    layout is not drawn (LLaVA-NeXT); a sample whose image cannot be drawn is skipped.
    """
    from vtprune import viz

    grids: dict[int, Any] = {}
    written = 0
    for run in runs:
        if run.cell.method is None:
            continue
        keep = str(run.cell.keep).replace(":", "").replace(",", "_").replace("=", "")  # auto:0.95,min=8 -> auto0.95_min8
        folder = where / f"{run.cell.method.replace('+', '_')}-keep{keep}"
        for sample in task.samples:
            rec = run.records.get(sample.index)
            if rec is None or rec.kept_indices is None:
                continue
            if sample.index not in grids:
                try:
                    grids[sample.index] = viz.token_grid(model, processor, sample.load_image())
                except ValueError as err:  # a layout viz does not draw: the same for every sample
                    print(f"vtprune: note: no overlays written: {err}", file=sys.stderr)
                    return {"dir": None, "note": str(err)}
                except Exception:
                    grids[sample.index] = None
            grid = grids[sample.index]
            if grid is None or max(rec.kept_indices, default=-1) >= grid.tokens:
                continue  # an unreadable image, or several images in one sample: not drawn
            folder.mkdir(parents=True, exist_ok=True)
            viz.overlay(grid, rec.kept_indices).save(folder / f"{sample.index}.png")
            written += 1
    return {"dir": str(where), "written": written}


def config_cells(paths: list[str]) -> list:
    """One cell per config file (`vtprune tune --out`, or ``PruneConfig.to_json``), labelled with its name."""
    from vtprune.config import load_config
    from vtprune.eval.runner import Cell

    cells = []
    for path in paths:
        cfg = load_config(path)
        cells.append(Cell(cfg.method, cfg.keep, cfg.layer, dict(cfg.options), source=Path(path).name))
    return cells


def run_eval(args) -> int:
    """Run ``vtprune eval`` for parsed ``args`` (see `vtprune.cli.build_parser`)."""
    import torch

    from vtprune.eval import report
    from vtprune.eval.distributed import finish, gather_to_main, init_process_group, launched_shard
    from vtprune.eval.memory import memory_measure
    from vtprune.eval.runner import Runner, build_cells, merge_runs, validate_cells
    from vtprune.eval.tasks import load_task
    from vtprune.loading import default_prompt, parse_options, resolve_model

    if args.batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    configs = list(getattr(args, "config", None) or [])
    args.method = list(args.method or ([] if configs else DEFAULT_METHODS))
    args.keep = list(args.keep or DEFAULT_KEEPS)
    torch.manual_seed(args.seed)

    task = load_task(args.task, args.limit, args.seed)
    resolve_model(args.model)
    options = parse_options(args.option)
    cells = build_cells(args.method, args.keep, args.layer, options)
    cells += config_cells(configs)
    from vtprune.eval.oracle import EVAL_ONLY

    for cell in cells:
        if cell.method in EVAL_ONLY and any(s.question_cells is None for s in task.samples):
            raise EvalError(f"--method {cell.method} knows the answer cells of the toy tasks only: use --task "
                            "toy-shapes (not a jsonl task or the noise control)")
    shard = launched_shard()
    device = resolve_device(args.device)
    if shard.world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", shard.local_rank)  # one GPU per process
    dtype = resolve_dtype(args.dtype, device)
    model, processor = load_eval_model(args.model, device, dtype)
    validate_cells(model, cells)
    out = Path(args.out)
    if shard.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise EvalError(f"cannot create the output directory {out} ({err}); give another --out") from None

    runner = Runner(model, processor, lambda s: default_prompt(model, processor, s.prompt_text()),
                    batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device=device,
                    dtype=dtype if dtype != torch.float32 else None)
    init_process_group(shard, device)
    try:
        parts = gather_to_main(shard, runner.run(task, cells, shard))
    finally:
        finish(shard)
    if not shard.main:
        return 0
    runs = merge_runs(parts)

    model_info = {"name": args.model, "class": type(model).__name__, "model_type": model.config.model_type,
                  "device": str(device), "dtype": str(dtype).removeprefix("torch."), "processes": shard.world}
    results = report.build_results(runs, task, config=config_dict(args), model_info=model_info,
                                   memory_measure=memory_measure(device), log_samples=args.log_samples)
    try:
        results["plot"] = str(report.plot(results, out / report.PLOT_FILE))
    except ImportError:
        results["plot"] = None
        print("vtprune: note: no plot written; install matplotlib (pip install 'vtprune[eval]')", file=sys.stderr)
    if args.save_overlays:
        results["overlays"] = save_overlays(runs, task, model, processor, out / "overlays")
    path = report.write_results(results, out)
    if args.json:
        print(json.dumps(results, indent=2, default=str))
        return 0
    print(report.summary_line(results))
    print()
    print(report.markdown_table(results))
    print()
    failed = results["failed_samples"]
    if failed:
        print(f"{len(failed)} sample(s) failed, counted as wrong; first: #{failed[0]['index']}: {failed[0]['error']}")
    print(f"wrote {path}" + (f" and {results['plot']}" if results["plot"] else ""))
    return 0
