"""`vtprune bench`: what pruning saves, measured side by side in one process on random-weight models.

    vtprune bench --arch llava --size medium --method fastv --keep 64
    vtprune bench --arch qwen2-vl --size 7b --method cls --keep 64 --device cuda --dtype bfloat16 --json

Random weights of a real architecture at a given shape (``tiny``; ``medium``, sized for a
CPU; ``7b``, the real widths, depths and vocabularies of LLaVA-1.5-7B / Qwen2-VL-7B / Qwen2.5-VL-7B,
for a GPU) and a prompt with the real visual-token counts (576 per image for LLaVA-1.5 and the
672 x 672 Qwen image; 2438 for a 500 x 400 LLaVA-NeXT image). Pruned and unpruned repetitions are
interleaved, so drift of the machine hits both alike. Measured:

- prefill latency (one forward with the KV cache, as generate's first step) and end-to-end latency of
  ``generate()`` for ``--new-tokens`` forced new tokens (medians); decode tokens/s from their difference;
- peak memory (`vtprune.eval.memory`) of one generate each way;
- KV-cache bytes after the prefill, and the bytes expected when exactly the dropped tokens leave the
  layers after the prune point;
- analytic prefill FLOPs (`vtprune.eval.flops`) both ways: their ratio is the speedup limit;
- the time vtprune itself spends in scoring and in compaction (`vtprune.state.PartTimer`), on separate
  profiled prefills (synchronised on CUDA), as a share of the unpruned prefill.

Each ratio is printed next to its limit; `TARGETS` are checked where they apply.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

import vtprune
from vtprune.eval.flops import image_geometry, llm_flops, vision_flops
from vtprune.eval.memory import PeakMemory
from vtprune.state import cache_of

ARCHS = ("llava", "llava-next", "qwen2-vl", "qwen2.5-vl")
SIZES = ("tiny", "medium", "7b")

# builder keyword arguments per (family, size); the vision towers keep the real patch geometry
_LLAVA = {
    "tiny": dict(),
    "medium": dict(hidden=768, layers=8, heads=12, intermediate=2048, vision_hidden=64, vision_layers=2),
    "7b": dict(hidden=4096, layers=32, heads=32, intermediate=11008, vocab_size=32064,  # Vicuna-7B
               vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096),  # ViT-L/14-336
}
_QWEN = {
    "tiny": dict(),
    "medium": dict(hidden=768, layers=8, heads=12, kv_heads=2, intermediate=2048, vision_hidden=64, vision_layers=2),
    "7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab_size=152064,
               vision_hidden=1280, vision_layers=32, vision_heads=16),
}
_VISION_7B = {"qwen2-vl": dict(vision_intermediate=5120),  # mlp_ratio 4
              "qwen2.5-vl": dict(vision_intermediate=3420, fullatt_blocks=[7, 15, 23, 31])}
QWEN_KIND = {"qwen2-vl": "qwen2_vl", "qwen2.5-vl": "qwen2_5_vl"}
QUESTION = "What is in the picture?"

# (arch, size, device type, method, keep) -> bound, checked when a run matches
TARGETS = {
    ("llava", "medium", "cpu", "fastv", 64): dict(speedup_vs_limit=0.8, overhead_share=0.03),
}


class BenchError(ValueError):
    """A bench argument that cannot run (unknown arch or size, no CUDA, a budget out of range)."""


def build(arch: str, size: str, device: torch.device, dtype: torch.dtype, batch: int):
    """``(model, inputs)``: a random-weight model of ``arch`` at ``size`` and a ``batch`` of prompts."""
    from vtprune.loading import default_prompt, synthetic_image

    if arch not in ARCHS:
        raise BenchError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise BenchError(f"unknown --size {size!r}; choose one of {', '.join(SIZES)}")
    images = [synthetic_image(i) for i in range(batch)]  # 500 x 400
    with torch.device(device):
        if arch in ("llava", "llava-next"):
            from vtprune.toy.tiny import tiny_llava, tiny_llava_processor

            model = tiny_llava(next_=arch == "llava-next", **_LLAVA[size])
            processor = tiny_llava_processor(next_=arch == "llava-next")
        else:
            from vtprune.toy.tiny_qwen import tiny_qwen, tiny_qwen_processor

            extra = _VISION_7B[arch] if size == "7b" else {}
            model = tiny_qwen(QWEN_KIND[arch], **_QWEN[size], **extra)
            processor = tiny_qwen_processor(QWEN_KIND[arch], max_pixels=672 * 672)
            images = [im.resize((672, 672)) for im in images]  # 576 merged tokens, as LLaVA-1.5
    model = model.to(device=device, dtype=dtype).eval()
    text = [default_prompt(model, processor, QUESTION)] * batch
    inputs = processor(images=images, text=text, return_tensors="pt")
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    return model, inputs


def kv_cache_bytes(model, inputs) -> int:
    """Bytes of keys and values the prefill leaves in the cache (every layer, every sample)."""
    with torch.inference_mode():
        out = model(**inputs, use_cache=True, logits_to_keep=1)
    cache = cache_of(out)  # the output names it as the call did (`cache` from transformers 5.24)
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
    return total


@dataclass
class _Clock:
    device: torch.device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _prefill(model, inputs, clock) -> float:
    t0 = clock()
    model(**inputs, use_cache=True, logits_to_keep=1)
    return clock() - t0


def _generate(model, inputs, clock, new_tokens: int, pad: int) -> float:
    t0 = clock()
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return clock() - t0


def run(arch: str = "llava", size: str = "medium", method: str = "fastv", keep: int | float = 64,
        layer: int | None = None, device: str = "cpu", dtype: str = "float32", batch: int = 1, repeats: int = 5,
        new_tokens: int = 32, options: dict | None = None) -> dict[str, Any]:
    """Run the benchmark; returns every measurement and ratio (see the module docstring)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was given but no CUDA device is available; use --device cpu")
    if repeats < 1 or new_tokens < 1 or batch < 1:
        raise BenchError("--repeats, --new-tokens and --batch must be at least 1")
    torch.manual_seed(0)
    model, inputs = build(arch, size, dev, getattr(torch, dtype), batch)
    tok_pad = model.config.text_config.pad_token_id or 0
    clock = _Clock(dev)
    vtprune.apply(model, method=method, keep=keep, layer=layer, **(options or {}))
    state = model._vtprune_state

    with torch.inference_mode():
        ref = model(**inputs, logits_to_keep=1).logits  # pruned: warm-up and the stats of this prompt
        st = vtprune.stats(model)
        with vtprune.disabled(model):
            full = model(**inputs, logits_to_keep=1).logits
        finite = bool(torch.isfinite(ref).all() and torch.isfinite(full).all())
        times = {"pruned": [], "unpruned": []}
        gen = {"pruned": [], "unpruned": []}
        for _ in range(repeats):  # interleaved
            times["pruned"].append(_prefill(model, inputs, clock))
            with vtprune.disabled(model):
                times["unpruned"].append(_prefill(model, inputs, clock))
        for _ in range(max(1, repeats // 2)):
            gen["pruned"].append(_generate(model, inputs, clock, new_tokens, tok_pad))
            with vtprune.disabled(model):
                gen["unpruned"].append(_generate(model, inputs, clock, new_tokens, tok_pad))
        with PeakMemory(dev) as mem_p:
            _generate(model, inputs, clock, new_tokens, tok_pad)
        with vtprune.disabled(model), PeakMemory(dev) as mem_u:
            _generate(model, inputs, clock, new_tokens, tok_pad)
        kv = {"pruned": kv_cache_bytes(model, inputs)}
        with vtprune.disabled(model):
            kv["unpruned"] = kv_cache_bytes(model, inputs)
        state.timer.enabled, state.timer.cuda, state.timer.seconds = True, dev.type == "cuda", {}
        for _ in range(repeats):
            model(**inputs, use_cache=True, logits_to_keep=1)
        state.timer.enabled = False
        parts = {k: v / repeats for k, v in state.timer.seconds.items()}
    vtprune.remove(model)

    cfg = model.config
    layers = cfg.text_config.num_hidden_layers
    geometry = image_geometry(cfg, inputs) or []
    vis = sum(vision_flops(cfg, g) or 0.0 for g in geometry)
    flops_u = sum(llm_flops(cfg, n) for n in st.seq_len_before) + vis
    flops_p = sum(llm_flops(cfg, n0, n1, st.stage, st.layer) for n0, n1 in zip(st.seq_len_before, st.seq_len_after)) + vis
    # tokens each layer caches: all of them up to the pruning layer (in-LLM), the kept ones after it
    before_layers = 0 if st.stage == "pre-llm" else st.layer + 1
    width_u = inputs["input_ids"].shape[1]
    width_p = width_u - min(a - b for a, b in zip(st.seq_len_before, st.seq_len_after))  # padded batch rows
    expected_kv = kv["unpruned"] * (before_layers * width_u + (layers - before_layers) * width_p) / (layers * width_u)

    med = {k: statistics.median(v) for k, v in times.items()}
    e2e = {k: statistics.median(v) for k, v in gen.items()}
    # generate = prefill + new_tokens - 1 decode steps; None where noise makes that difference meaningless
    decode = {k: batch * (new_tokens - 1) / (e2e[k] - med[k]) if e2e[k] > med[k] else None for k in e2e}
    speedup, limit = med["unpruned"] / med["pruned"], flops_u / flops_p
    overhead = sum(parts.values())
    result = {
        "arch": arch, "size": size, "method": method, "keep": keep, "layer": st.layer, "stage": st.stage,
        "device": str(dev), "dtype": dtype, "batch": batch, "repeats": repeats, "new_tokens": new_tokens,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "visual_tokens": {"before": st.visual_before, "after": st.visual_after},
        "sequence": {"before": st.seq_len_before, "after": st.seq_len_after},
        "prefill_ms": {k: v * 1e3 for k, v in med.items()}, "prefill_speedup": speedup,
        "flops_prefill": {"unpruned": flops_u, "pruned": flops_p}, "flop_ratio": limit,
        "speedup_vs_limit": speedup / limit,
        "e2e_ms": {k: v * 1e3 for k, v in e2e.items()}, "e2e_speedup": e2e["unpruned"] / e2e["pruned"],
        "decode_tokens_per_s": decode,
        "peak_memory_mib": {"pruned": mem_p.mib, "unpruned": mem_u.mib, "measure": mem_p.measure},
        "kv_cache_bytes": kv, "kv_cache_expected_bytes": expected_kv,
        "kv_ratio": kv["unpruned"] / kv["pruned"], "kv_ratio_limit": kv["unpruned"] / expected_kv,
        "vtprune_ms": {k: v * 1e3 for k, v in parts.items()},
        "overhead_share": overhead / med["unpruned"],
        "finite": finite,
    }
    target = TARGETS.get((arch, size, dev.type, method, keep))
    if target:
        result["targets"] = {
            "speedup_vs_limit": {"min": target["speedup_vs_limit"], "ok": result["speedup_vs_limit"] >= target["speedup_vs_limit"]},
            "overhead_share": {"max": target["overhead_share"], "ok": result["overhead_share"] <= target["overhead_share"]},
            "kv_in_proportion": {"ok": abs(kv["pruned"] - expected_kv) <= 0.01 * expected_kv},
        }
    return result


def _decode_row(d: dict[str, float | None]) -> str:
    u, p = d["unpruned"], d["pruned"]
    cell = [f"{x:.1f}" if x is not None else "n/a" for x in (u, p)]
    ratio = f"{p / u:.2f}x" if u and p else "n/a"
    return f"| decode tokens/s | {cell[0]} | {cell[1]} | {ratio} | | |"


def table(r: dict[str, Any]) -> str:
    """The result as a markdown table: each measured ratio beside its limit."""
    p, u = "pruned", "unpruned"
    where = "pre-LLM" if r["stage"] == "pre-llm" else f"after LLM layer {r['layer']}"
    mem = r["peak_memory_mib"]
    lines = [
        f"**{r['arch']} {r['size']}**, {r['method']} keep {r['keep']} ({where}), {r['device_name']} {r['dtype']}, "
        f"batch {r['batch']}, {r['threads']} threads, torch {r['torch']}: visual tokens "
        f"{r['visual_tokens']['before'][0]} -> {r['visual_tokens']['after'][0]}, sequence "
        f"{r['sequence']['before'][0]} -> {r['sequence']['after'][0]}",
        "",
        "| quantity | unpruned | pruned | ratio | limit | ratio / limit |",
        "|---|---:|---:|---:|---:|---:|",
        f"| prefill ms (median of {r['repeats']}) | {r['prefill_ms'][u]:.1f} | {r['prefill_ms'][p]:.1f} | "
        f"{r['prefill_speedup']:.2f}x | {r['flop_ratio']:.2f}x (FLOPs) | {r['speedup_vs_limit']:.2f} |",
        f"| prefill GFLOPs | {r['flops_prefill'][u] / 1e9:.2f} | {r['flops_prefill'][p] / 1e9:.2f} | "
        f"{r['flop_ratio']:.2f}x | | |",
        f"| generate ms, {r['new_tokens']} new tokens | {r['e2e_ms'][u]:.1f} | {r['e2e_ms'][p]:.1f} | "
        f"{r['e2e_speedup']:.2f}x | | |",
        _decode_row(r["decode_tokens_per_s"]),
        f"| KV-cache MiB | {r['kv_cache_bytes'][u] / 2**20:.2f} | {r['kv_cache_bytes'][p] / 2**20:.2f} | "
        f"{r['kv_ratio']:.2f}x | {r['kv_ratio_limit']:.2f}x (dropped tokens) | {r['kv_ratio'] / r['kv_ratio_limit']:.2f} |",
        f"| peak memory MiB ({mem['measure']}) | {mem[u]:.1f} | {mem[p]:.1f} | | | |",
    ]
    parts = ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(r["vtprune_ms"].items())) or "none"
    lines += ["", f"vtprune's own time per pruned prefill: {parts} = {r['overhead_share']:.1%} of the unpruned prefill"]
    for name, t in r.get("targets", {}).items():
        bound = f">= {t['min']}" if "min" in t else f"<= {t['max']:.0%}" if "max" in t else "within 1 %"
        lines.append(f"target {name} {bound}: {'met' if t['ok'] else 'NOT met'}")
    return "\n".join(lines)
