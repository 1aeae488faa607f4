"""Pruning under FlashAttention-2 and flex_attention on a GPU, against sdpa with the same weights.

    python benchmarks/attention_kernels_check.py                       # what this machine has (CUDA)
    python benchmarks/attention_kernels_check.py --impls flash_attention_2 --budget-s 40
    python benchmarks/attention_kernels_check.py --device cpu        # CPU smoke test: tests/fa2_standin.py

The CPU tests (tests/test_attention_kernels.py) run FlashAttention-2's mask contract through a torch stand-in
and flex_attention without torch.compile; this script runs the real kernels: ``flash_attention_2`` (needs
the flash_attn package; the whole model, vision tower included, as users load it) and compiled
``flex_attention`` (the language model only; transformers has none for Qwen-VL). Per implementation and
tiny model (llava, qwen2_vl), float16, on a batch of two samples that keep different numbers of tokens
(fillers), left-padded:

- unpatched: the implementation's logits against sdpa's (the baseline difference of the kernels);
- keep-all: fastv keep=1.0 (in-LLM) and random keep=1.0 (pre-LLM) against the unpatched model of the same
  implementation;
- in-LLM / staged / pre-LLM: fastv @1, transprune @0,1,2 and random against tests/oracle.py's references
  on the sdpa model (the masking oracle, the staged oracle, the language model on the kept tokens);
- generate: 4 tokens with the cache (random in-LLM @1 and pre-LLM: the same selection under both kernels)
  against the sdpa-patched model's generate().

Each row prints the max |diff| and its ratio to the reference's max |value|; PASS when that ratio is within
the dtype's tolerance (and tokens agree for generate). Writes ``DIR/gpu_attention.md`` (``--out``, else
``$OUT``, else benchmarks/results) in benchmarks/gpu_check.py's format. Exit 0 when nothing failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))
sys.path.insert(2, str(ROOT / "tests"))  # oracle.py (and fa2_standin.py for the CPU smoke test)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gpu_check import REL_TOL, Budget, Report, _rel, _short  # noqa: E402

import vtprune  # noqa: E402

KINDS = ("llava", "qwen2_vl")
LAYER = 1
KEEP = 0.3  # a fraction: images of different sizes (and samples with more images) keep different counts
STAGED = {"layers": [0, 1, 2], "ratios": [0.5, 0.25]}
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _image(h: int, w: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def make_inputs(kind: str, device: str, dtype: torch.dtype) -> dict:
    """Two left-padded prompts whose samples keep different numbers of tokens at KEEP (LLaVA: 2 images and 1;
    Qwen2-VL: one image each, of different sizes)."""
    if kind == "llava":
        from vtprune.toy.tiny import tiny_llava_processor

        proc = tiny_llava_processor()
        texts = ["USER: <image> <image>\nWhat is in the picture? ASSISTANT:",
                 "USER: <image>\nWhat is in the picture? What is in the picture? ASSISTANT:"]
        images = [_image(400, 500, s) for s in range(3)]
    else:
        from vtprune.toy.tiny_qwen import tiny_qwen_processor

        proc = tiny_qwen_processor(kind)
        texts = [f"<|im_start|>user\n{QWEN_IMAGE}" + "What is in the picture? " * (i + 1)
                 + "<|im_end|>\n<|im_start|>assistant\n" for i in range(2)]
        images = [_image(300, 400, 0), _image(220, 330, 1)]
    proc.tokenizer.padding_side = "left"
    out = dict(proc(images=images, text=texts, return_tensors="pt", padding=True))
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor) else v
            for k, v in out.items()}


def build(kind: str, impl: str, device: str, dtype: torch.dtype):
    """The tiny model of ``kind`` (fixed seed: the same weights for every implementation) under ``impl``."""
    from vtprune.toy.tiny import tiny_llava
    from vtprune.toy.tiny_qwen import tiny_qwen

    attn = impl
    if impl == "flex_attention":  # the language model only: the masks under test are its
        attn = {"": "sdpa", "text_config": "flex_attention", "vision_config": "sdpa"}
    if impl == "standin":
        import fa2_standin

        attn = "sdpa"
    model = tiny_qwen(kind, attn_implementation=attn) if kind.startswith("qwen") else tiny_llava(attn_implementation=attn)
    if impl == "standin":
        fa2_standin.register()
        model.config._attn_implementation = fa2_standin.NAME
    return model.to(device=device, dtype=dtype).eval()


def _valid(inputs) -> torch.Tensor:
    return inputs["attention_mask"].bool()


def _generate(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)


def checks(impl: str, kind: str, model, sdpa, inputs, device: str):
    """Yields ``(check, max |diff|, relative, extra problem or None)`` for one implementation and model."""
    import oracle

    with torch.no_grad():
        ref = model(**inputs).logits
        base = sdpa(**inputs).logits
    valid = _valid(inputs)
    yield ("unpatched vs sdpa", *_rel(ref[valid], base[valid]), None)
    for method, layer in (("fastv", LAYER), ("random", None)):
        vtprune.apply(model, method=method, keep=1.0, layer=layer)
        try:
            with torch.no_grad():
                same = model(**inputs).logits
        finally:
            vtprune.remove(model)
        yield (f"keep-all {method}", *_rel(same[valid], ref[valid]), None)

    for name, method, options in (("in-LLM fastv", "fastv", {"layer": LAYER}), ("staged transprune", "transprune", STAGED),
                                  ("pre-LLM random", "random", {})):
        vtprune.apply(model, method=method, keep=KEEP, **options)
        try:
            with torch.no_grad():
                pruned = model(**inputs).logits
            st = vtprune.stats(model)
        finally:
            vtprune.remove(model)
        with torch.no_grad(), torch.device(device):
            if st.stage == "pre-llm":
                expected, keep_rows = oracle.lm_on_kept(sdpa, inputs, st)
                diff = _rel(pruned[keep_rows], expected[keep_rows])
            else:
                stages = [(s["layer"], dataclasses.replace(st, kept=s["kept"])) for s in st.stages] if st.stages else [
                    (st.layer, st)]
                stages = [(k, oracle.dropped_positions(sdpa, inputs["input_ids"], s)) for k, s in stages]
                expected = oracle.staged_masked_logits(sdpa, inputs, stages)
                check = valid & ~stages[-1][1]
                diff = _rel(pruned[check], expected[check])
        ragged = len(set(st.visual_after)) > 1
        yield (f"{name} vs oracle", *diff, None if ragged else "not ragged (no fillers): the case lost its point")

    # random selections: the same tokens under both kernels (fastv's scores follow each kernel's rounding)
    for method, options in (("random in-LLM", {"layer": LAYER}), ("random pre-LLM", {})):
        outs = []
        for m in (model, sdpa):
            vtprune.apply(m, method="random", keep=KEEP, **options)
            try:
                outs.append(_generate(m, inputs))
            finally:
                vtprune.remove(m)
        got, want = outs
        same_tokens = torch.equal(got.sequences, want.sequences)
        diff = max((_rel(a, b) for a, b in zip(got.logits, want.logits)), key=lambda d: d[1])
        yield (f"generate {method} vs sdpa", *diff, None if same_tokens else "generated tokens differ")


def run(args) -> Report:
    dtype = getattr(torch, args.dtype)
    tol = REL_TOL[dtype]
    rep = Report("attention", args.out, f"pruning under FlashAttention-2 / flex_attention, {args.device}, {args.dtype}",
                 ["implementation", "model", "check", "max abs diff", "relative"],
                 f"batch 2, left-padded, samples keeping different counts (keep={KEEP}); pass: relative <= {tol:g}.")
    budget = Budget(args.budget_s)
    for impl in args.impls.split(","):
        if impl == "flash_attention_2":
            try:
                import flash_attn  # noqa: F401
            except Exception as err:
                rep.add("skipped", [impl, "-", "flash_attn not importable", "-", "-"], _short(err))
                continue
        for kind in args.models.split(","):
            if impl == "flex_attention" and kind.startswith("qwen"):
                rep.add("skipped", [impl, kind, "transformers has no flex_attention for Qwen-VL", "-", "-"])
                continue
            if budget.left() <= 0:
                rep.add("skipped", [impl, kind, "(budget spent)", "-", "-"])
                continue
            try:
                model, sdpa = build(kind, impl, args.device, dtype), build(kind, "sdpa", args.device, dtype)
                inputs = make_inputs(kind, args.device, dtype)
                for name, diff, rel, problem in checks(impl, kind, model, sdpa, inputs, args.device):
                    ok = rel <= tol and problem is None
                    rep.add("pass" if ok else "fail", [impl, kind, name, diff, rel],
                            None if ok else problem or f"relative {rel:.3g} > {tol:g}")
                    print(f"[attention] {impl} {kind} {name}: max |diff| {diff:.3g} (rel {rel:.3g}) "
                          f"{'PASS' if ok else 'FAIL'}{'' if problem is None else ' - ' + problem}", flush=True)
            except Exception as err:
                rep.add("error", [impl, kind, "-", "-", "-"], _short(err, 400))
                print(f"[attention] {impl} {kind}: ERROR {_short(err, 400)}", flush=True)
                traceback.print_exc()
            if budget.left() <= 0:
                rep.note(f"budget of {args.budget_s:g} s spent after {impl} {kind}")
    return rep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--impls", default=None, help="comma-separated: flash_attention_2, flex_attention, standin "
                   "(tests/fa2_standin.py); default flash_attention_2,flex_attention on CUDA, standin on the CPU")
    p.add_argument("--models", default=None, help=f"comma-separated tiny models (default {','.join(KINDS)})")
    p.add_argument("--quick", action="store_true", help="llava only")
    p.add_argument("--dtype", "--dtypes", default=None, help="default float16 on CUDA (FlashAttention takes half "
                   "precision), float32 on the CPU; of a list (gpu_check.sh's --dtypes) the first")
    p.add_argument("--budget-s", type=float, default=None, help="start no new model after this many seconds")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    args, unknown = p.parse_known_args(argv)  # gpu_check.sh passes its extra arguments to every part
    if unknown:
        print(f"attention_kernels_check: ignoring {' '.join(unknown)}", flush=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("attention_kernels_check: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    if args.impls is None:
        args.impls = "flash_attention_2,flex_attention" if args.device == "cuda" else "standin"
    if args.models is None:
        args.models = "llava" if args.quick else ",".join(KINDS)
    args.dtype = (args.dtype or ("float16" if args.device == "cuda" else "float32")).split(",")[0]
    torch.manual_seed(0)
    rep = run(args)
    rep.write(done=True)
    failed = rep.counts["fail"] or rep.counts["error"]
    print(f"attention_kernels_check: {rep.summary()} -> {rep.path}: {'FAIL' if failed else 'PASS'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(3)
