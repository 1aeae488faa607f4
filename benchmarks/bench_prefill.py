"""Prefill time pruned vs unpruned, side by side in one process, on a built-in random LLaVA or Qwen2-VL.

    python benchmarks/bench_prefill.py --out benchmarks/results/prefill_cpu.md
    python benchmarks/bench_prefill.py --arch qwen2-vl --out benchmarks/results/prefill_cpu_qwen2vl.md
    python benchmarks/bench_prefill.py --device cuda --dtype float16 --size 7b-shape --out ...

Also checks, on the same model, that keep-all pruning reproduces the unpatched logits and that the
pruned logits of the last token stay finite. Random weights: this measures speed, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import vtprune
from vtprune.loading import synthetic_image
from vtprune.toy.tiny import tiny_llava, tiny_llava_processor
from vtprune.toy.tiny_qwen import tiny_qwen, tiny_qwen_processor

SIZES = {
    # LLM width/depth; the vision tower keeps LLaVA-1.5's 336 px / patch 14 geometry (576 tokens)
    "small": dict(hidden=512, layers=8, heads=8, vision_hidden=64, vision_layers=4),
    "7b-shape": dict(hidden=4096, layers=8, heads=32, vision_hidden=1024, vision_layers=4),  # 32 layers in 7B
}
QWEN_SIZES = {
    # Qwen2-VL geometry (patch 14, 2x2 merger); a 672 x 672 image gives 576 merged tokens, as LLaVA-1.5
    "small": dict(hidden=512, layers=8, heads=8, kv_heads=2, vision_hidden=64, vision_layers=4),
    "7b-shape": dict(hidden=3584, layers=8, heads=28, kv_heads=4, vision_hidden=1280, vision_layers=4),
}
QWEN_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the picture?<|im_end|>\n"
SETTINGS = [("fastv", 64, 2), ("fastv", 192, 2), ("cls", 64, None), ("cls", 192, None)]


def timed(model, inputs, repeats: int, device: str) -> float:
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    times = []
    with torch.inference_mode():
        for _ in range(2):
            model(**inputs, logits_to_keep=1)
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            sync()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="llava", choices=["llava", "qwen2-vl"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    images = [synthetic_image(i) for i in range(args.batch)]
    if args.arch == "qwen2-vl":
        model = tiny_qwen("qwen2_vl", **QWEN_SIZES[args.size]).to(args.device, dtype)
        proc = tiny_qwen_processor("qwen2_vl", max_pixels=672 * 672)
        images = [im.resize((672, 672)) for im in images]
        inputs = proc(images=images, text=[QWEN_PROMPT] * args.batch, return_tensors="pt")
    else:
        model = tiny_llava(**SIZES[args.size]).to(args.device, dtype)
        proc = tiny_llava_processor()
        inputs = proc(images=images, text=["USER: <image>\nWhat is in the picture? ASSISTANT:"] * args.batch,
                      return_tensors="pt")
    inputs = {k: (v.to(args.device, dtype) if v.is_floating_point() else v.to(args.device)) for k, v in inputs.items()}

    with torch.inference_mode():
        ref = model(**inputs).logits
        vtprune.apply(model, method="fastv", keep=1.0, layer=2)
        keep_all = model(**inputs).logits
    keep_all_diff = (keep_all - ref).abs().max().item()
    vtprune.remove(model)
    full = timed(model, inputs, args.repeats, args.device)

    rows = []
    for method, keep, layer in SETTINGS:
        vtprune.apply(model, method=method, keep=keep, layer=layer)
        t = timed(model, inputs, args.repeats, args.device)
        with torch.inference_mode():
            finite = bool(torch.isfinite(model(**inputs).logits[:, -1]).all())
        st = vtprune.stats(model)
        with vtprune.disabled(model):
            t_full = timed(model, inputs, args.repeats, args.device)
        vtprune.remove(model)
        n = st.seq_len_before[0]
        # the FLOP ratio of the LLM part: layers before the pruning point run on n tokens
        n_layers = len(model.model.language_model.layers)
        pre = 0 if layer is None else layer + 1
        flop_ratio = n * n_layers / (n * pre + st.seq_len_after[0] * (n_layers - pre))
        rows.append(dict(method=method, keep=keep, layer=layer, seq=f"{n}->{st.seq_len_after[0]}",
                         unpruned_ms=t_full * 1e3, pruned_ms=t * 1e3, speedup=t_full / t,
                         llm_token_ratio=flop_ratio, finite=finite))

    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = [
        f"# prefill, {args.size} {'Qwen2-VL' if args.arch == 'qwen2-vl' else 'LLaVA'} ({name}, {args.dtype}, batch {args.batch}, torch {torch.__version__})",
        "",
        f"keep-all max |logit diff| vs unpatched: {keep_all_diff:.2e}; unpruned prefill {full * 1e3:.1f} ms",
        "",
        "| method | keep | layer | tokens | unpruned ms | pruned ms | speedup | LLM token-layer ratio |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['keep']} | {r['layer']} | {r['seq']} | {r['unpruned_ms']:.1f} | "
                     f"{r['pruned_ms']:.1f} | {r['speedup']:.2f}x | {r['llm_token_ratio']:.2f}x |")
    text = "\n".join(lines)
    print(text)
    assert all(r["finite"] for r in rows), "non-finite logits after pruning"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump(dict(args=vars(args), keep_all_diff=keep_all_diff, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
