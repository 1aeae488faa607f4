"""The checks for a lent GPU machine, one part per call; `benchmarks/gpu_check.sh` runs them all (~8 min).

    python benchmarks/gpu_check.py presets [--device cuda] [--out DIR]   # (a) every preset, bf16 + fp16
    python benchmarks/gpu_check.py sync                                  # (b) decode under sync-debug "error"
    python benchmarks/gpu_check.py bench                                 # (c) vtprune bench --size 7b
    python benchmarks/gpu_check.py compact                               # (d) benchmarks/bench_compact.py
    python benchmarks/gpu_check.py presets --device cpu --quick          # what a CPU can check of this script

Each part writes ``DIR/gpu_<part>.md`` (DIR: ``--out``, else ``$OUT``, else benchmarks/results), rewritten
after every case so a part killed by its timeout still leaves its results, with ``nvidia-smi -L``, the
versions and a summary line of pass / fail counts. ``--budget-s``: start no new case after that many
seconds (the rest are listed as skipped). Needs only torch, transformers and this checkout (no pytest, no
network); the exactness references come from tests/oracle.py.

(a) presets: on every tiny model (llava, next, qwen2_vl, qwen2_5_vl, qwen3_vl) in each dtype: keep-all
    (keep=1.0) logits against the unpatched model (max |diff|; "identical" when 0), pruned logits finite,
    a 2-token generate, and drop == mask: the pruned logits against tests/oracle.py's references (in-LLM:
    the unpatched model with the dropped key columns masked after the pruning layer, staged alike;
    pre-LLM: the unpatched LM on the kept tokens), relative max |diff| within the dtype's tolerance.
    Presets that merge features (visionzip, vflowopt) or hide tokens in the vision tower (flowcut) have
    no oracle here; refusals (ConfigError / UnsupportedModelError) are listed, not failed.
(b) sync: per model and preset (bf16), ``generate()`` of 3 tokens three ways: (1) the sync-debug mode
    "warn" around every forward, each warning attributed to vtprune or the model by the Python stack
    (as `vtprune.eval.opcount` attributes ops): syncs per prefill and per decode step; (2) "error" around
    the decode forwards only (the prefill outside): the first sync there, if any, and whose it is; (3)
    `vtprune.eval.opcount.count_prefill_decode` on the same GPU, to compare the CPU counting tool with
    what CUDA reports. Pass: no vtprune-attributed sync in a decode step. The unpatched model is the
    baseline row (its own syncs are the model's).
(c) bench: ``vtprune bench --size 7b`` for llava and qwen2-vl, fastv / cls / visionzip at keep 64, batch 1
    then 8 (llava float16, qwen2-vl bfloat16). Pass: the command succeeds and the logits are finite.
(d) compact: ``benchmarks/bench_compact.py`` (compact, recycle-new, recycle-kept against torch), its table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import vtprune  # noqa: E402

MODELS = ("llava", "next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
KEEP = 12
# relative max |diff| (to max |reference|) allowed per dtype: keep-all and drop == mask
REL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
NO_ORACLE = {"visionzip": "merges features", "vflowopt": "merges features", "flowcut": "hides tokens in the tower"}


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def _cmd(args: list[str], timeout: float = 20) -> str:
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        return (res.stdout + res.stderr).strip()
    except Exception as err:
        return f"({args[0]}: {type(err).__name__}: {err})"


def environment() -> list[str]:
    import transformers

    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "not importable"
    gpu = _cmd(["nvidia-smi", "-L"]) if torch.cuda.is_available() else "(no CUDA device)"
    return [
        "```",
        f"$ nvidia-smi -L\n{gpu}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"transformers {transformers.__version__}, triton {triton_v}, vtprune {vtprune.__version__}",
        f"git {_cmd(['git', '-C', str(ROOT), 'rev-parse', '--short', 'HEAD'])}, host {platform.node()}, "
        f"{os.cpu_count()} CPUs",
        f"command: {' '.join(shlex.quote(a) for a in sys.argv)}",
        "```",
    ]


class Report:
    """A markdown file rewritten after every row: title, environment, summary line, table, details."""

    def __init__(self, part: str, out_dir: Path, title: str, columns: list[str], intro: str = ""):
        self.path = out_dir / f"gpu_{part}.md"
        self.title, self.columns, self.intro = title, columns, intro
        self.rows: list[list[str]] = []
        self.details: list[str] = []
        self.counts: Counter = Counter()
        self.env = environment()
        self.t0 = time.perf_counter()
        out_dir.mkdir(parents=True, exist_ok=True)
        self.write(done=False)

    def add(self, status: str, cells: list, detail: str | None = None) -> None:
        self.counts[status] += 1
        self.rows.append([_cell(c) for c in cells] + [status])
        if detail:
            self.details.append(f"- {' '.join(_cell(c) for c in cells[:3] if _cell(c) != '-')}: {detail}")
        self.write(done=False)

    def note(self, text: str) -> None:
        self.details.append(text)
        self.write(done=False)

    def summary(self) -> str:
        order = ["pass", "fail", "error", "refused", "skipped", "info"]
        keys = order + sorted(k for k in self.counts if k not in order)
        return ", ".join(f"{self.counts[k]} {k}" for k in keys if self.counts[k])

    def write(self, done: bool) -> None:
        state = f"done in {time.perf_counter() - self.t0:.0f} s" if done else "IN PROGRESS (or killed by the timeout)"
        lines = [f"# {self.title}", "", *self.env, "",
                 f"**summary: {self.summary() or 'nothing run'}** ({state})", ""]
        if self.intro:
            lines += [self.intro, ""]
        lines += ["| " + " | ".join(self.columns + ["status"]) + " |",
                  "|" + "---|" * (len(self.columns) + 1)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.details:
            lines += ["", "## Details", "", *self.details]
        self.path.write_text("\n".join(lines) + "\n")


def _cell(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}"
    if isinstance(x, tuple):
        return " / ".join(_cell(v) for v in x)
    return " ".join(str(x).split()).replace("|", "/")


def _short(err: BaseException, n: int = 160) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= n else text[:n] + "..."


class Budget:
    def __init__(self, seconds: float | None):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - (time.perf_counter() - self.t0)


# ------------------------------------------------------------------------------------------------
# models and inputs (benchmarks/overhead.py builds them)
# ------------------------------------------------------------------------------------------------


def model_on(kind: str, device: str, dtype: torch.dtype):
    from overhead import get_model

    return copy.deepcopy(get_model(kind)).to(device=device, dtype=dtype).eval()


def inputs_on(kind: str, batch: int, device: str, dtype: torch.dtype) -> dict:
    from overhead import make_inputs

    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor) else v
            for k, v in make_inputs(kind, batch).items()}


def presets(selected: str | None) -> list[str]:
    from overhead import method_strings

    names = method_strings()
    if selected:
        wanted = selected.split(",")
        names = [n for n in names if n in wanted or n.split("+")[0] in wanted] + [
            w for w in wanted if w not in names and not any(n.split("+")[0] == w for n in names)]
    return names


def _apply(model, method: str, keep):
    from overhead import apply_preset

    apply_preset(model, method, keep, exact=True)


def _pad_id(model):
    pad = getattr(model.generation_config, "pad_token_id", None)
    return pad if pad is not None else getattr(model.config.get_text_config(), "pad_token_id", None)


# ------------------------------------------------------------------------------------------------
# (a) presets: finite, keep-all, drop == mask
# ------------------------------------------------------------------------------------------------


def _oracle():
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import oracle

        return oracle
    except Exception as err:  # the references are optional: keep-all and finite still run
        print(f"tests/oracle.py not importable ({_short(err)}): no drop == mask check", flush=True)
        return None


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``(max |a - b|, that / max |b|)`` in float32."""
    if a.numel() == 0:
        return 0.0, 0.0
    diff = (a.float() - b.float()).abs().max().item()
    return diff, diff / max(b.float().abs().max().item(), 1e-12)


def check_preset(model, inputs, ref, method: str, dtype, device: str, oracle) -> tuple[str, list, str | None]:
    try:
        _apply(model, method, 1.0)
    except (vtprune.ConfigError, vtprune.UnsupportedModelError) as err:
        vtprune.remove(model)
        return "refused", ["-", "-", "-", "-"], _short(err)
    try:
        with torch.no_grad():
            same = model(**inputs).logits
            _apply(model, method, KEEP)
            pruned = model(**inputs).logits
            st = vtprune.stats(model)  # this forward's (generate's prefill may select otherwise in half precision)
            tokens = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=_pad_id(model))
    finally:
        vtprune.remove(model)
    keep_all, keep_all_rel = _rel(same, ref) if same.shape == ref.shape else (float("inf"), float("inf"))
    finite = bool(torch.isfinite(pruned[:, -1]).all())
    problems = []
    if not finite:
        problems.append("pruned last-token logits not finite")
    if keep_all_rel > REL_TOL[dtype]:
        problems.append(f"keep-all differs: max |diff| {keep_all:.3g} (rel {keep_all_rel:.3g})")
    if tokens.shape[0] != inputs["input_ids"].shape[0]:
        problems.append("generate lost samples")
    if not any(a < b for a, b in zip(st.visual_after, st.visual_before)):
        problems.append("nothing pruned")
    base = method.split("+")[-1]
    oracle_cell = "no oracle" if oracle is None else f"no oracle ({NO_ORACLE[base]})" if base in NO_ORACLE else None
    if oracle_cell is None:  # the model is unpatched again here, as the oracle needs it
        with torch.no_grad(), torch.device(device):
            diff, rel = _oracle_diff(oracle, model, inputs, st, pruned)
        oracle_cell = f"{diff:.3g} (rel {rel:.3g})"
        if not rel <= REL_TOL[dtype]:
            problems.append(f"drop != mask: max |diff| {diff:.3g} (rel {rel:.3g} > {REL_TOL[dtype]:g})")
    cells = ["identical" if keep_all == 0 else f"{keep_all:.3g} (rel {keep_all_rel:.3g})", finite, oracle_cell,
             f"{st.stage}{'' if st.layer is None else f' @{st.layer}'} {st.visual_before[0]}->{st.visual_after[0]}"]
    return ("fail" if problems else "pass"), cells, "; ".join(problems) or None


def _oracle_diff(oracle, model, inputs, st, pruned) -> tuple[float, float]:
    import dataclasses

    if st.stage != "pre-llm" and st.stages:
        stages = [(s["layer"], oracle.dropped_positions(model, inputs["input_ids"], dataclasses.replace(st, kept=s["kept"])))
                  for s in st.stages]
        expected = oracle.staged_masked_logits(model, inputs, stages)
        check = inputs["attention_mask"].bool() & ~stages[-1][1]
        return _rel(pruned[check], expected[check])
    if st.stage != "pre-llm":
        dropped = oracle.dropped_positions(model, inputs["input_ids"], st)
        expected = oracle.masked_logits(model, inputs, st.layer, dropped)
        check = inputs["attention_mask"].bool() & ~dropped
        return _rel(pruned[check], expected[check])
    expected, valid = oracle.lm_on_kept(model, inputs, st)
    if pruned.shape[1] != expected.shape[1]:
        return float("inf"), float("inf")
    return _rel(pruned[valid], expected[valid])


def part_presets(args) -> Report:
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    rep = Report("presets", args.out, f"(a) every preset on every tiny model, {args.device}, "
                 + " / ".join(str(d).removeprefix("torch.") for d in dtypes),
                 ["model", "dtype", "method", "keep-all vs unpatched", "finite", "drop vs mask: max abs diff", "stage, tokens"],
                 f"keep={KEEP} tokens per image for the pruned run; batch 2 (two prompts of different lengths, "
                 f"left-padded); relative tolerance {', '.join(f'{str(k)[6:]} {v:g}' for k, v in REL_TOL.items())}.")
    oracle = _oracle()
    budget = Budget(args.budget_s)
    for dtype in dtypes:  # every model in the first dtype before the second: a cut-off run still covers them
        for kind in args.models.split(","):
            dname = str(dtype).removeprefix("torch.")
            try:
                model = model_on(kind, args.device, dtype)
                inputs = inputs_on(kind, args.batch or 2, args.device, dtype)
                with torch.no_grad():
                    ref = model(**inputs).logits
            except Exception as err:
                rep.add("error", [kind, dname, "(model)", "-", "-", "-", "-"], _short(err, 400))
                continue
            for method in presets(args.methods):
                if budget.left() <= 0:
                    rep.add("skipped", [kind, dname, method, "-", "-", "-", "-"])
                    continue
                try:
                    status, cells, detail = check_preset(model, inputs, ref, method, dtype, args.device, oracle)
                except Exception as err:
                    status, cells, detail = "error", ["-"] * 4, _short(err, 300) + " @ " + _where_tb(err)
                rep.add(status, [kind, dname, method, *cells], detail)
                print(f"[presets] {kind} {dname} {method}: {status} {detail or ''}", flush=True)
            del model
            _free()
    return rep


# ------------------------------------------------------------------------------------------------
# (b) sync: decode steps under the sync-debug mode
# ------------------------------------------------------------------------------------------------

SYNC_MESSAGE = "synchronizing CUDA operation"


def _where_tb(err: BaseException) -> str:
    """``owner file:line`` of the innermost frame outside torch of an exception's traceback."""
    from vtprune.eval import opcount

    tb = err.__traceback__
    if tb is None:
        return "?"
    while tb.tb_next is not None:
        tb = tb.tb_next
    owner, frame = opcount._attribute(tb.tb_frame)
    return f"{'vtprune' if owner == opcount._VTPRUNE else 'model'} {opcount._where(frame)}"


def _set_mode(mode) -> None:
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode(mode)


class _Phased:
    """generate() with the sync-debug mode of each forward given by ``mode_of(call index)``; in "warn",
    every sync warning is attributed (vtprune or model) by the Python stack and counted per forward."""

    def __init__(self, model, mode_of):
        self.model, self.mode_of = model, mode_of
        self.call = 0
        self.per_call: list[Counter] = []
        self.sites: Counter = Counter()

    def _pre(self, module, args, kwargs):
        while len(self.per_call) <= self.call:
            self.per_call.append(Counter())
        _set_mode(self.mode_of(self.call))

    def _post(self, module, args, kwargs, output):
        _set_mode(0)
        self.call += 1

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if SYNC_MESSAGE not in str(message):
            return self._previous(message, category, filename, lineno, file, line)
        from vtprune.eval import opcount

        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename == warnings.__file__:
            frame = frame.f_back
        owner, frame = opcount._attribute(frame)
        who = "vtprune" if owner == opcount._VTPRUNE else "model"
        if self.call < len(self.per_call):
            self.per_call[self.call][who] += 1
        if who == "vtprune":
            self.sites[opcount._where(frame)] += 1

    def generate(self, inputs, steps: int = 2):
        n = steps + 1
        h1 = self.model.register_forward_pre_hook(self._pre, prepend=True, with_kwargs=True)
        h2 = self.model.register_forward_hook(self._post, with_kwargs=True, always_call=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                self._previous = warnings.showwarning
                warnings.showwarning = self._show
                with torch.no_grad():
                    return self.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                               pad_token_id=_pad_id(self.model))
        finally:
            _set_mode(0)
            h1.remove()
            h2.remove()


def sync_case(model, inputs, device: str) -> dict:
    """Warn-mode counts per phase, the error-mode decode outcome and opcount's counts, on the current model."""
    from vtprune.eval.opcount import count_prefill_decode

    out: dict = {}
    if device == "cuda":
        warn = _Phased(model, lambda i: "warn")
        warn.generate(inputs)
        calls = warn.per_call
        decode = calls[1:] or [Counter()]
        out["warn_prefill"] = (calls[0]["vtprune"], calls[0]["model"]) if calls else (0, 0)
        out["warn_decode"] = (sum(c["vtprune"] for c in decode) / len(decode), sum(c["model"] for c in decode) / len(decode))
        out["warn_sites"] = warn.sites
        err_run = _Phased(model, lambda i: "error" if i >= 1 else 0)
        try:
            err_run.generate(inputs)
            out["error_mode"] = "no sync"
        except RuntimeError as err:
            out["error_mode"] = f"sync: {_where_tb(err)}"
            out["error_owner"] = _where_tb(err).split()[0]
    counts = count_prefill_decode(model, inputs, decode_steps=2)
    out["opcount"] = (counts.prefill.vtprune_syncs, counts.decode_mean("vtprune_syncs"))
    out["opcount_sites"] = counts.prefill.sync_sites + counts.decode_total.sync_sites
    return out


def part_sync(args) -> Report:
    dtype = getattr(torch, args.dtypes.split(",")[0])
    cuda = args.device == "cuda"
    rep = Report("sync", args.out, f"(b) host syncs per prefill and decode step, {args.device} {str(dtype)[6:]}",
                 ["model", "method", "prefill syncs vtprune / model (warn)", "decode syncs/step vtprune / model (warn)",
                  "decode under \"error\"", "opcount vtprune syncs prefill / decode-step"],
                 f"keep={KEEP}, batch {args.batch or 2}, generate() of 3 tokens (prefill + 2 decode steps)."
                 + ("" if cuda else " Not on CUDA: only opcount's columns (the sync-debug mode needs a GPU)."))
    budget = Budget(args.budget_s)
    for kind in args.models.split(","):
        try:
            model = model_on(kind, args.device, dtype)
            inputs = inputs_on(kind, args.batch or 2, args.device, dtype)
            base = sync_case(model, inputs, args.device)
            rep.add("info", [kind, "(unpatched)", base.get("warn_prefill"), base.get("warn_decode"),
                             base.get("error_mode"), base["opcount"]])
        except Exception as err:
            rep.add("error", [kind, "(model)", "-", "-", "-", "-"], _short(err, 400) + " @ " + _where_tb(err))
            continue
        for method in presets(args.methods):
            if budget.left() <= 0:
                rep.add("skipped", [kind, method, "-", "-", "-", "-"])
                continue
            try:
                _apply(model, method, KEEP)
            except (vtprune.ConfigError, vtprune.UnsupportedModelError) as err:
                vtprune.remove(model)
                rep.add("refused", [kind, method, "-", "-", "-", "-"], _short(err))
                continue
            try:
                r = sync_case(model, inputs, args.device)
            except Exception as err:
                rep.add("error", [kind, method, "-", "-", "-", "-"], _short(err, 300) + " @ " + _where_tb(err))
                continue
            finally:
                vtprune.remove(model)
            if cuda:
                bad = r["warn_decode"][0] > 0 or r.get("error_owner") == "vtprune"
                status = "fail" if bad else "pass"
            else:
                status = "fail" if r["opcount"][1] > 0 else "pass"
            sites = r.get("warn_sites") or Counter()
            detail = None
            if status == "fail" or sites:
                detail = "CUDA warn sites: " + ("; ".join(f"{n}x {s}" for s, n in sites.most_common(8)) or "none")
                detail += " | opcount sites: " + ("; ".join(f"{n}x {op} @ {w}" for (op, w), n in
                                                            r["opcount_sites"].most_common(8)) or "none")
            rep.add(status, [kind, method, r.get("warn_prefill"), r.get("warn_decode"), r.get("error_mode"),
                             r["opcount"]], detail)
            print(f"[sync] {kind} {method}: {status}", flush=True)
        del model
        _free()
    return rep


# ------------------------------------------------------------------------------------------------
# (c) vtprune bench --size 7b
# ------------------------------------------------------------------------------------------------


def part_bench(args) -> Report:
    from vtprune.cli import main as cli_main

    size = args.bench_size or ("tiny" if args.quick else "7b")
    archs = ["llava"] if args.quick else ["llava", "qwen2-vl"]
    methods = (args.methods or "fastv").split(",") if args.quick else (args.methods or "fastv,cls,visionzip").split(",")
    batches = [1] if args.quick else [int(b) for b in str(args.batch or "1,8").split(",")]
    repeats, new_tokens = (1, 2) if args.quick else (args.bench_repeats, args.bench_new_tokens)
    dtypes = {"llava": "float16", "qwen2-vl": "bfloat16"} if args.device == "cuda" else {}
    rep = Report("bench", args.out, f"(c) vtprune bench --size {size}, keep 64, {args.device}",
                 ["arch", "method", "batch", "dtype", "prefill ms unpruned / pruned", "speedup (limit)",
                  "generate speedup", "vtprune share of prefill", "finite"],
                 f"--repeats {repeats} --new-tokens {new_tokens}; each run's full table is under Details.")
    budget = Budget(args.budget_s)
    longest = 0.0
    for b in batches:
        for arch in archs:
            for method in methods:
                dtype = dtypes.get(arch, "float32")
                argv = ["bench", "--arch", arch, "--size", size, "--method", method, "--keep", "64", "--device",
                        args.device, "--dtype", dtype, "--batch", str(b), "--repeats", str(repeats),
                        "--new-tokens", str(new_tokens), "--json"]
                if budget.left() < longest * 1.2:
                    rep.add("skipped", [arch, method, b, dtype] + ["-"] * 5, "not enough of the part's budget left")
                    continue
                t0 = time.perf_counter()
                buf = io.StringIO()
                try:
                    with contextlib.redirect_stdout(buf):
                        rc = cli_main(argv)
                    result = json.loads(buf.getvalue()[buf.getvalue().index("{"):])
                except BaseException as err:  # SystemExit from the CLI's error path too
                    if isinstance(err, KeyboardInterrupt):
                        raise
                    rep.add("error", [arch, method, b, dtype] + ["-"] * 5,
                            f"`vtprune {' '.join(argv)}`: {_short(err, 300)} {buf.getvalue()[-300:]}")
                    _free()
                    continue
                longest = max(longest, time.perf_counter() - t0)
                ms, ok = result["prefill_ms"], rc == 0 and result.get("finite", False)
                try:
                    from vtprune.eval.bench import table

                    full = table(result)
                except Exception as err:
                    full = f"(table: {_short(err)})"
                rep.add("pass" if ok else "fail",
                        [arch, method, b, dtype, f"{ms['unpruned']:.1f} / {ms['pruned']:.1f}",
                         f"{result['prefill_speedup']:.2f}x ({result['flop_ratio']:.2f}x)", f"{result['e2e_speedup']:.2f}x",
                         f"{result['overhead_share']:.1%}", result.get("finite")])
                rep.note(f"\n### `vtprune {' '.join(argv[:-1])}` ({time.perf_counter() - t0:.0f} s)\n\n{full}\n")
                print(f"[bench] {arch} {method} b{b}: {'pass' if ok else 'fail'} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
                _free()
    return rep


# ------------------------------------------------------------------------------------------------
# (d) the kernel table
# ------------------------------------------------------------------------------------------------


def part_compact(args) -> Report:
    rep = Report("compact", args.out, f"(d) compact / recycle kernels, {args.device}",
                 ["command", "rc", "seconds"], "benchmarks/bench_compact.py: compact, recycle-new and recycle-kept "
                 "against a copy and torch gather (+ scatter_add merge); its table is under Details.")
    md = args.out / f"compact_{'gpu' if args.device == 'cuda' else 'cpu'}.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_compact.py"), "--out", str(md), "--device", args.device]
    if args.quick or args.device == "cuda":
        cmd.append("--quick")
    if args.quick:
        cmd += ["--dtypes", "float16", "--repeats", "2"]
    timeout = max(10.0, args.budget_s) if args.budget_s else None
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        rc, tail = res.returncode, (res.stdout + res.stderr)[-3000:]
    except subprocess.TimeoutExpired as err:
        rc, tail = "timeout", str(err.stdout or "")[-3000:]
    seconds = time.perf_counter() - t0
    rep.add("pass" if rc == 0 else "fail", [" ".join(shlex.quote(str(c)) for c in cmd), rc, seconds])
    rep.note(md.read_text() if rc == 0 and md.exists() else f"```\n{tail}\n```")
    return rep


# ------------------------------------------------------------------------------------------------


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


PARTS = {"presets": part_presets, "sync": part_sync, "bench": part_bench, "compact": part_compact}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=sorted(PARTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="one model, one preset (a CPU smoke test of this script)")
    p.add_argument("--models", default=None, help=f"comma-separated tiny models (default: {','.join(MODELS)})")
    p.add_argument("--methods", default=None, help="comma-separated presets (default: all; bench: fastv,cls,visionzip)")
    p.add_argument("--dtypes", default=None, help="default bfloat16,float16 on CUDA, float32 on the CPU")
    p.add_argument("--batch", default=None, help="presets/sync: batch size (default 2); bench: list (default 1,8)")
    p.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds")
    p.add_argument("--bench-size", default=None, help="bench: --size (default 7b; tiny with --quick)")
    p.add_argument("--bench-repeats", type=int, default=3)
    p.add_argument("--bench-new-tokens", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    if args.dtypes is None:
        args.dtypes = "bfloat16,float16" if args.device == "cuda" else "float32"
    if args.models is None:
        args.models = "llava" if args.quick else ",".join(MODELS)
    if args.quick and args.methods is None and args.part in ("presets", "sync"):
        args.methods = "fastv"
    if args.part in ("presets", "sync") and args.batch is not None:
        args.batch = int(args.batch)
    torch.manual_seed(0)
    rep = PARTS[args.part](args)
    rep.write(done=True)
    print(f"gpu_check {args.part}: {rep.summary()} -> {rep.path}", flush=True)
    return 0 if not (rep.counts["fail"] or rep.counts["error"]) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(3)
