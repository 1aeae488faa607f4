"""The ``vtprune`` command line: ``methods``, ``run``, ``eval``, ``bench``, ``demo``, ``calibrate``, ``tune``,
``--version``."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from vtprune.config import ConfigError
from vtprune.loading import (
    BUILTIN_MODELS,
    TOY_MODELS,
    ModelNotFoundError,
    default_prompt,
    load_model,
    parse_options,
    synthetic_image,
)


def _parse_keep(text: str) -> int | float | str:
    if text.strip().lower().startswith("auto"):
        from vtprune.config import ConfigError, parse_auto_keep

        try:
            return str(parse_auto_keep(text))
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--keep must be an int (tokens per image), a float in (0, 1] or auto:<mass> (e.g. auto:0.95), "
                f"got {text!r}"
            ) from None


def _time_prefill(model, inputs, repeats: int) -> float:
    import torch

    times = []
    with torch.inference_mode():
        model(**inputs)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cmd_run(args) -> int:
    import torch

    import vtprune

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, processor = load_model(args.model)
    image = synthetic_image(args.seed)
    prompt = args.prompt or default_prompt(model, processor)
    placeholder = getattr(processor, "image_token", None)
    if placeholder and placeholder not in prompt:
        raise ConfigError(f"--prompt must contain the image placeholder {placeholder!r} where the image goes")
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    vtprune.apply(model, method=args.method, keep=args.keep, layer=args.layer, **parse_options(args.option))
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    st = vtprune.stats(model)
    pruned_t = _time_prefill(model, inputs, args.repeats)
    with vtprune.disabled(model):
        full_t = _time_prefill(model, inputs, args.repeats)
    print(f"model            {args.model} ({type(model).__name__})")
    print(f"config           {vtprune.config_of(model).to_json()}")
    print(f"pruning          {st.summary()}")
    print(f"kept indices     {st.kept[0][:16].tolist()}{' ...' if st.kept[0].numel() > 16 else ''}")
    print(f"sequence         {st.seq_len_before[0]} -> {st.seq_len_after[0]} tokens")
    print(f"prefill          unpruned {full_t * 1e3:.1f} ms | pruned {pruned_t * 1e3:.1f} ms | "
          f"speedup {full_t / pruned_t:.2f}x (median of {args.repeats}, same process)")
    text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"generated        {text!r}")
    return 0


def cmd_eval(args) -> int:
    from vtprune.eval.command import run_eval

    return run_eval(args)


def cmd_tune(args) -> int:
    import torch

    from vtprune.calibrate import image_files, load_image
    from vtprune.tune import calibration_batches, tune

    if args.samples < 1 or args.trials < 1 or args.batch_size < 1:
        raise ConfigError("vtprune tune: --samples, --trials and --batch-size must be at least 1")
    torch.manual_seed(0)
    questions = list(args.question)
    if args.images:
        images = [load_image(p) for p in image_files(args.images, args.samples)]
        source = f"{len(images)} images from {args.images}"
    else:
        from vtprune.eval.tasks import ONE_WORD, load_task

        task = load_task("toy-shapes", args.samples, args.calibration_seed)
        images = [s.load_image() for s in task.samples]
        questions = questions or [f"{s.question} {ONE_WORD}" for s in task.samples]
        source = f"{len(images)} toy-shapes samples (seed {args.calibration_seed})"
    model, processor = load_model(args.model)
    batches = calibration_batches(model, processor, images, questions, args.batch_size)
    print(f"model            {args.model} ({type(model).__name__})")
    print(f"calibration      {source}")
    print("objective        mean cos(final hidden state of the last prompt token, pruned vs unpruned)")

    def show(i, point, value):
        mark = "defaults" if i == 0 else f"trial {i}"
        print(f"  {mark:<10} {value:.6f}  {json.dumps(point, sort_keys=True)}")

    result = tune(model, batches, args.method, args.keep, trials=args.trials, seed=args.seed, layer=args.layer,
                  options=parse_options(args.option), progress=show)
    keep = str(args.keep).replace(":", "").replace(",", "_").replace("=", "")
    out = result.save(args.out or Path("vtprune-tuned") / f"{args.method.replace('+', '_')}-keep{keep}.json")
    cfg = result.config
    print(f"best             {result.objective:.6f} (defaults {result.baseline:.6f}): layer={cfg.layer} "
          f"options={json.dumps(cfg.options, sort_keys=True)}")
    print(f"wrote            {out}")
    print(f"use it           vtprune.apply(model, config={str(out)!r})  |  vtprune eval --config {out}")
    return 0


def cmd_calibrate(args) -> int:
    import torch

    from vtprune.calibrate import calibrate, image_files
    from vtprune.calibration import default_output_path, save_calibration

    torch.manual_seed(0)
    files = image_files(args.images, args.limit)  # fail on a bad directory before loading the model
    model, processor = load_model(args.model)
    data = calibrate(model, processor, files, host=args.host, layer=args.layer, prompts=args.prompt or None,
                     tau=args.tau)
    path = save_calibration(data, args.out or default_output_path(model))
    trend = data["trend"][args.host.lower()]
    poly = " ".join(f"{c:+.4g} {x}" for c, x in zip(trend["coeffs"][1:], ("x", "x^2", "x^3")))
    where = f"layer {trend['layer']}" if trend["layer"] is not None else "before the LLM"
    print(f"model            {args.model} ({type(model).__name__})")
    print(f"images           {len(files)} from {args.images}")
    print(f"trend            T(x) = 1 {poly} (host {args.host}, {where}; w(1) = {1 / sum(trend['coeffs']):.3f})")
    sink = data["sink"]
    dims = sink["dims"] or "none found"
    print(f"sink dims        {dims} (tau {sink['tau']:g}, layers {sink['layers'][0]}..{sink['layers'][-1]}; "
          f"{sink['visual_sink_fraction']:.2%} of visual tokens flagged)")
    print(f"wrote            {path}")
    return 0


def cmd_bench(args) -> int:
    from vtprune.eval.bench import run, table

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run(arch=args.arch, size=args.size, method=args.method, keep=args.keep, layer=args.layer,
                 device=args.device, dtype=args.dtype, batch=args.batch, repeats=args.repeats,
                 new_tokens=args.new_tokens, options=parse_options(args.option))
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


def cmd_demo(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit("vtprune: error: the demo needs gradio: pip install 'vtprune[demo]'") from None
    from vtprune.demo import DemoEngine, build_demo

    model, processor = load_model(args.model)
    app = build_demo(DemoEngine(model, processor, name=args.model))
    app.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


def cmd_methods(args) -> int:
    import vtprune

    if args.table:
        from vtprune.support import markdown_table, support_matrix

        print("trying every preset on a tiny random model of each family (1-2 min on 2 CPU cores) ...",
              file=sys.stderr)
        print(markdown_table(support_matrix()))
        return 0
    for name, desc in vtprune.methods().items():
        print(f"{name:11s} {desc}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Input errors as one line, exit status 2 (subcommands use the same class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int, wording: str):
    """An argparse type: an integer ``>= minimum`` (``wording`` says so in the error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be {wording}")
        return value

    return parse


_positive_int = _int_at_least(1, "at least 1")
_non_negative_int = _int_at_least(0, "0 or more")


def _device(text: str) -> str:
    """A torch device string (cpu, cuda, cuda:1, mps, ...), or ``auto``."""
    if text == "auto":
        return text
    import torch

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    from vtprune import __version__

    parser = _Parser(prog="vtprune", description="Training-free visual token pruning for VLMs")
    parser.add_argument("--version", action="version", version=f"vtprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    methods = sub.add_parser("methods", help="list the pruning methods")
    methods.add_argument("--table", action="store_true",
                         help="print which method runs on which model family (tried on tiny random models, 1-2 min)")
    methods.set_defaults(func=cmd_methods)
    run = sub.add_parser(
        "run",
        help="prune one synthetic image on a model and print kept tokens and prefill time vs unpruned",
    )
    run.add_argument("--model", default="small-llava",
                     help=f"built-in random model ({', '.join(BUILTIN_MODELS)}) or a local checkpoint dir")
    run.add_argument("--method", default="fastv", help="pruning method (see `vtprune methods`)")
    run.add_argument("--keep", type=_parse_keep, default=64, help="tokens per image (int) or fraction (float)")
    run.add_argument("--layer", type=int, default=None, help="in-LLM pruning layer (default: the method's)")
    run.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="method option")
    run.add_argument("--prompt", default=None,
                     help="the full prompt with the image placeholder (default: a question in the model's format)")
    run.add_argument("--max-new-tokens", type=_positive_int, default=8)
    run.add_argument("--repeats", type=_positive_int, default=5, help="timed prefills per setting")
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(func=cmd_run)
    ev = sub.add_parser(
        "eval",
        help="accuracy, visual tokens, latency, FLOPs and memory of pruning methods on a VQA task vs unpruned",
    )
    ev.add_argument("--model", default="toy-llava",
                    help=f"trained toy model ({', '.join(TOY_MODELS)}), tiny random model "
                         f"({', '.join(BUILTIN_MODELS)}) or a local checkpoint dir (default: toy-llava)")
    ev.add_argument("--method", action="append", default=None,
                    help="pruning method; repeat for several (default: fastv, cls, random)")
    ev.add_argument("--config", action="append", default=[], metavar="FILE",
                    help="also evaluate the configuration in FILE (written by `vtprune tune --out`); repeatable")
    ev.add_argument("--keep", action="append", type=_parse_keep, default=None,
                    help="tokens per image (int) or fraction (float); repeat for several (default: 64)")
    ev.add_argument("--task", default="toy-shapes",
                    help="toy-shapes (the synthetic test split), toy-shapes-noise (its questions on noise images: "
                         "a model that looks falls to chance), toy-shapes-crowded (4-6 objects, no count questions) "
                         "or the path of a .jsonl task (default: toy-shapes)")
    ev.add_argument("--limit", type=int, default=None,
                    help="first N samples (default: 300 for toy-shapes, every record of a jsonl task)")
    ev.add_argument("--batch-size", type=int, default=8, help="samples per batch (left padded; default 8)")
    ev.add_argument("--out", default="vtprune-eval",
                    help="output directory for results.json and the plot (default: ./vtprune-eval)")
    ev.add_argument("--json", action="store_true", help="print the results JSON on stdout instead of the table")
    ev.add_argument("--log-samples", action="store_true", help="record every prediction in results.json")
    ev.add_argument("--save-overlays", action="store_true",
                    help="write OUT/overlays/<method>-keep<K>/<sample>.png: each image with its pruned tokens darkened")
    ev.add_argument("--layer", type=int, default=None,
                    help="in-LLM pruning layer for the methods that prune inside the LLM (default: the method's)")
    ev.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                    help="method option, given to the methods that declare it; repeat for several")
    ev.add_argument("--max-new-tokens", type=int, default=4, help="generated tokens per answer (default 4)")
    ev.add_argument("--seed", type=int, default=0, help="torch seed and toy-shapes generator seed (default 0)")
    ev.add_argument("--device", type=_device, default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    ev.add_argument("--dtype", default="auto",
                    help="auto (float32 on CPU, bfloat16 on CUDA), float32, float16 or bfloat16")
    ev.set_defaults(func=cmd_eval)
    from vtprune.eval.bench import ARCHS, SIZES

    bench = sub.add_parser("bench", help="prefill, generate, decode, memory, KV cache and FLOPs pruned vs "
                                         "unpruned, side by side on a random-weight model of a real shape")
    bench.add_argument("--arch", default="llava", choices=ARCHS)
    bench.add_argument("--size", default="medium", choices=SIZES,
                       help="tiny; medium (for a CPU); 7b (the 7B models' real shapes, for a GPU)")
    bench.add_argument("--method", default="fastv", help="pruning method (see `vtprune methods`)")
    bench.add_argument("--keep", type=_parse_keep, default=64, help="tokens per image (int) or fraction (float)")
    bench.add_argument("--layer", type=int, default=None, help="in-LLM pruning layer (default: the method's)")
    bench.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="method option")
    bench.add_argument("--device", type=_device, default="cpu", help="cpu or cuda")
    bench.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    bench.add_argument("--batch", type=_positive_int, default=1)
    bench.add_argument("--repeats", type=_positive_int, default=5, help="timed prefills each way (interleaved)")
    bench.add_argument("--new-tokens", type=_positive_int, default=32, help="forced new tokens per generate")
    bench.add_argument("--threads", type=_non_negative_int, default=0, help="torch CPU threads (default: torch's)")
    bench.add_argument("--json", action="store_true", help="print every measurement as JSON")
    bench.set_defaults(func=cmd_bench)
    demo = sub.add_parser("demo", help="a Gradio app: ask about an image, see the pruned and unpruned answers "
                                       "and which visual tokens were kept")
    demo.add_argument("--model", default="toy-llava",
                      help=f"trained toy model ({', '.join(TOY_MODELS)}), tiny random model or a local checkpoint "
                           "dir (default: toy-llava)")
    demo.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    demo.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    demo.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    demo.set_defaults(func=cmd_demo)
    cal = sub.add_parser(
        "calibrate",
        help="fit debias's positional trend and find sink dims on calibration images; write a calibration file",
    )
    cal.add_argument("--model", required=True,
                     help=f"built-in random model ({', '.join(BUILTIN_MODELS)}) or a local checkpoint dir")
    cal.add_argument("--images", required=True, help="directory of .png/.jpg calibration images (or one image)")
    cal.add_argument("--host", default="fastv", help="host scorer whose score trend is fitted (default: fastv)")
    cal.add_argument("--layer", type=int, default=None, help="in-LLM layer of the host (default: the host's)")
    cal.add_argument("--limit", type=int, default=None, help="use at most N images (sorted by name)")
    cal.add_argument("--prompt", action="append", default=[],
                     help="full prompt with the image placeholder; repeat for several (default: a question)")
    cal.add_argument("--tau", type=float, default=20.0,
                     help="sink threshold on phi (default 20; phi <= sqrt(hidden size))")
    cal.add_argument("--out", default=None,
                     help="output file (default: ~/.cache/vtprune/calibration/<model key>.json)")
    cal.set_defaults(func=cmd_calibrate)
    tn = sub.add_parser(
        "tune",
        help="search a method's hyperparameters for a model and budget (hidden-state fidelity); write a config file",
    )
    tn.add_argument("--model", default="toy-llava",
                    help="built-in or trained toy model, or a local checkpoint dir (default: toy-llava)")
    tn.add_argument("--method", required=True, help="the method to tune, e.g. fastv, visionzip, debias+fastv")
    tn.add_argument("--keep", required=True, type=_parse_keep, help="the budget to tune for (int, fraction, auto:..)")
    tn.add_argument("--layer", type=int, default=None, help="fix the in-LLM layer instead of searching it")
    tn.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="a method option held fixed")
    tn.add_argument("--images", default=None,
                    help="directory of calibration images (default: toy-shapes images, a different seed than eval's)")
    tn.add_argument("--question", action="append", default=[],
                    help="calibration question(s), cycled over the images (default: the task's or a generic one)")
    tn.add_argument("--samples", type=int, default=32, help="calibration samples (default 32)")
    tn.add_argument("--trials", type=int, default=16, help="configurations evaluated, the defaults first (default 16)")
    tn.add_argument("--seed", type=int, default=0, help="search seed (default 0)")
    tn.add_argument("--calibration-seed", type=int, default=1,
                    help="toy-shapes seed of the calibration samples (default 1; eval's default is 0)")
    tn.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward (default 8)")
    tn.add_argument("--out", default=None, help="output file (default: vtprune-tuned/<method>-keep<keep>.json)")
    tn.set_defaults(func=cmd_tune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vtprune.adapters import UnsupportedModelError
    from vtprune.eval.bench import BenchError
    from vtprune.eval.errors import EvalError

    try:
        return args.func(args)
    except (ConfigError, UnsupportedModelError, EvalError, ModelNotFoundError, BenchError) as err:
        print(f"vtprune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
