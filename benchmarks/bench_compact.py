"""Bandwidth of compact / compact+recycle against a plain copy and against torch gather + a separate merge.

    python benchmarks/bench_compact.py --out benchmarks/results/compact_h100.md   # GPU: Triton + torch
    python benchmarks/bench_compact.py --out /tmp/compact_cpu.md                  # CPU: torch path only

Shapes: LLaVA-1.5-7B (D 4096) and Qwen2-VL-7B (D 3584) visual tokens, B 1-8, N 576-2880, keep 64-576,
fp16/bf16. Ops (all read ``[B, N, D]`` and write a ``[B, rows, D]`` result):

- ``compact``: gather K kept rows. Bytes = K*D read + K*D written (+ indices).
- ``recycle-new``: keep K rows and merge the other N-K into R=16 new tokens (weighted means).
  Bytes = N*D read + (K+R)*D written.
- ``recycle-kept``: keep K rows and merge the other N-K into their assigned kept rows.
  Bytes = N*D read + K*D written.

Each op is compared with ``dst.copy_(src)`` moving the same number of bytes (read + written) and with
torch: ``torch.gather`` / ``index_select`` for compact, and gather + ``scatter_add_`` merge + ``cat``
for recycle. GPU timing: CUDA events around CUDA-graph replays (launch gaps out of the numbers), warm
up first, median of repeats; each replay cycles through enough independent input sets to overflow
L2, so the numbers are DRAM bandwidth, not cache bandwidth. CPU timing: perf_counter, median.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: a checkout run

from vtprune.kernels import compact_torch, recycle_torch, triton_available  # noqa: E402

R_SLOTS = 16
MODELS = {"llava-1.5-7b": 4096, "qwen2-vl-7b": 3584}
NK = [(576, 64), (576, 192), (2880, 64), (2880, 192), (2880, 576)]


# ----------------------------------------------------------------------------------------------
# inputs and the torch baselines
# ----------------------------------------------------------------------------------------------


def make_set(B, N, D, K, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, device=device).to(dtype)
    perm = torch.argsort(torch.rand(B, N, generator=g, device=device), dim=1)
    keep = perm[:, :K].contiguous()
    merge = perm[:, K:].contiguous()
    M = N - K
    s = dict(x=x, keep=keep, merge=merge)
    s["slot_new"] = torch.randint(0, R_SLOTS, (B, M), generator=g, device=device)
    s["slot_kept"] = torch.randint(0, K, (B, M), generator=g, device=device)
    s["w"] = torch.rand(B, M, generator=g, device=device) + 0.1
    s["kw"] = torch.rand(B, K, generator=g, device=device) + 0.5
    return s


def torch_gather(x, idx):
    return torch.gather(x, 1, idx.unsqueeze(2).expand(-1, -1, x.shape[2]))


def torch_index_select(x, idx):
    B, N, D = x.shape
    flat = (idx + torch.arange(B, device=x.device).unsqueeze(1) * N).reshape(-1)
    return x.reshape(B * N, D).index_select(0, flat).view(B, idx.shape[1], D)


def torch_gather_merge(s, into):
    """The two-step baseline: gather kept rows, gather merged rows, scatter_add the weighted sums."""
    x, w = s["x"], s["w"]
    B, _, D = x.shape
    kept = torch_gather(x, s["keep"])
    rows = torch_gather(x, s["merge"]).float() * w.unsqueeze(2)
    slot = s["slot_new"] if into == "new" else s["slot_kept"]
    S = R_SLOTS if into == "new" else kept.shape[1]
    acc = torch.zeros(B, S, D, device=x.device).scatter_add_(1, slot.unsqueeze(2).expand(-1, -1, D), rows)
    wsum = torch.zeros(B, S, device=x.device).scatter_add_(1, slot, w)
    if into == "new":
        new = (acc / wsum.clamp_min(1e-30).unsqueeze(2)).to(x.dtype)
        return torch.cat([kept, new], dim=1)
    kw = s["kw"]
    return ((acc + kept.float() * kw.unsqueeze(2)) / (wsum + kw).unsqueeze(2)).to(x.dtype)


def recycle_args(s, into):
    slot = s["slot_new"] if into == "new" else s["slot_kept"]
    kw = dict(into=into, num_slots=R_SLOTS) if into == "new" else dict(into=into, keep_weight=s["kw"])
    return (s["x"], s["keep"], s["merge"], slot, s["w"]), kw


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def time_cuda(fns, repeats, warmup=3):
    """Median microseconds per call over graph replays of ``fns`` (one call each per replay)."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    mode = "graph"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for f in fns:
                f()
        run = graph.replay
    except Exception as e:  # a non-capturable op: time eagerly
        print(f"  (graph capture failed: {type(e).__name__}: {e}; timing eagerly)", file=sys.stderr)
        torch.cuda.synchronize()
        mode = "eager"

        def run():
            for f in fns:
                f()

    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    return statistics.median(times), mode


def time_cpu(fns, repeats, warmup=1):
    for _ in range(warmup):
        for f in fns:
            f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for f in fns:
            f()
        times.append((time.perf_counter() - t0) * 1e6 / len(fns))
    return statistics.median(times), "eager"


# ----------------------------------------------------------------------------------------------
# one shape
# ----------------------------------------------------------------------------------------------


def op_bytes(op, B, N, D, K, elem):
    idx = 8 * B * K
    if op == "compact":
        return 2 * B * K * D * elem + idx
    rows_out = K + (R_SLOTS if op == "recycle-new" else 0)
    # every token is read once (kept or merged), ids/slots/weights are small extras
    return B * N * D * elem + B * rows_out * D * elem + idx + 20 * B * (N - K)


def bench_shape(model, D, B, N, K, dtype, device, args, use_triton):
    elem = torch.tensor([], dtype=dtype).element_size()
    timer = time_cuda if device == "cuda" else time_cpu
    if device == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
        touched = op_bytes("compact", B, N, D, K, elem)
        n_sets = max(1, min(args.max_sets, math.ceil(4 * l2 / touched)))
    else:
        n_sets = 1
    sets = [make_set(B, N, D, K, dtype, device, seed) for seed in range(n_sets)]
    if use_triton:
        from vtprune.kernels.triton_compact import triton_compact, triton_recycle

        # correctness before timing: bit-exact gather, recycle close to the two-step baseline
        s = sets[0]
        assert torch.equal(triton_compact(s["x"], s["keep"]), torch_gather(s["x"], s["keep"]))
        for into in ("new", "kept"):
            a, kw = recycle_args(s, into)
            got, ref = triton_recycle(*a, **kw).out.float(), torch_gather_merge(s, into).float()
            tol = 4 * torch.finfo(dtype).eps * (1 + ref.abs().max().item())
            err = (got - ref).abs().max().item()
            assert err <= tol, f"recycle-{into}: max err {err} > {tol}"

    rows = []
    copies = {}

    def copy_time(nbytes):
        if nbytes not in copies:
            n = nbytes // (2 * elem)
            pairs = [(torch.empty(n, dtype=dtype, device=device), torch.randn(n, device=device).to(dtype))]
            pairs += [(torch.empty_like(a), torch.empty_like(b).copy_(b)) for a, b in pairs * (n_sets - 1)]
            copies[nbytes] = timer([lambda p=p: p[0].copy_(p[1]) for p in pairs], args.repeats)[0]
        return copies[nbytes]

    for op in ("compact", "recycle-new", "recycle-kept"):
        nbytes = op_bytes(op, B, N, D, K, elem)
        t_copy = copy_time(nbytes)
        if op == "compact":
            t_gather, _ = timer([lambda s=s: torch_gather(s["x"], s["keep"]) for s in sets], args.repeats)
            t_isel, _ = timer([lambda s=s: torch_index_select(s["x"], s["keep"]) for s in sets], args.repeats)
            t_ref, _ = timer([lambda s=s: compact_torch(s["x"], s["keep"]) for s in sets], args.repeats)
            base = min(t_gather, t_isel)
            base_name = "gather" if t_gather <= t_isel else "index_select"
            if use_triton:
                t_op, mode = timer([lambda s=s: triton_compact(s["x"], s["keep"]) for s in sets], args.repeats)
            else:
                t_op, mode = t_ref, "eager"
        else:
            into = op.split("-")[1]
            base, _ = timer([lambda s=s, i=into: torch_gather_merge(s, i) for s in sets], args.repeats)
            base_name = "gather+scatter_add"
            fn = triton_recycle if use_triton else recycle_torch
            fns = [lambda a=a, k=k, f=fn: f(*a, **k) for a, k in (recycle_args(s, into) for s in sets)]
            t_op, mode = timer(fns, args.repeats)
        row = dict(
            model=model,
            dtype=str(dtype).replace("torch.", ""),
            B=B,
            N=N,
            K=K,
            D=D,
            op=op,
            impl="triton" if use_triton else "torch",
            mb=nbytes / 1e6,
            us=t_op,
            gbs=nbytes / t_op / 1e3,
            copy_us=t_copy,
            copy_gbs=nbytes / t_copy / 1e3,
            pct_copy=100 * t_copy / t_op,
            baseline=base_name,
            baseline_us=base,
            speedup=base / t_op,
            timing=mode,
            sets=n_sets,
        )
        rows.append(row)
        print(
            f"{model:13s} {row['dtype']:8s} B={B} N={N:4d} K={K:3d} {op:12s} {t_op:9.1f} us "
            f"{row['gbs']:7.0f} GB/s  {row['pct_copy']:5.1f}% of copy  x{row['speedup']:.2f} vs {base_name}",
            flush=True,
        )
    return rows


def shapes(device, quick):
    if device == "cpu":
        return [("llava-1.5-7b", 4096, 1, 576, 64), ("llava-1.5-7b", 4096, 1, 576, 192), ("qwen2-vl-7b", 3584, 1, 576, 64)]
    out = []
    for model, D in MODELS.items():
        batches = (1, 4, 8) if model.startswith("llava") else (1, 8)
        if quick:
            batches = (1, 8)
        for B in batches:
            for N, K in NK:
                out.append((model, D, B, N, K))
    return out


def markdown(rows, meta):
    lines = [
        f"# compact / recycle bandwidth ({meta['device']})",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}; timing: {meta['timing']}. "
        "GB/s counts bytes read + written; `% copy` = time of `dst.copy_(src)` moving the same bytes / "
        "time of the op; `speedup` = torch baseline time / op time (baseline: torch.gather or "
        "index_select, whichever is faster, for compact; gather + scatter_add_ merge + cat for recycle). "
        f"recycle-new merges the N-K pruned tokens into R={R_SLOTS} new tokens; recycle-kept into the kept ones.",
        "",
        "| model | dtype | B | N | K | op | impl | MB | us | GB/s | copy GB/s | % copy | baseline us | speedup |",
        "|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['B']} | {r['N']} | {r['K']} | {r['op']} | {r['impl']} | "
            f"{r['mb']:.1f} | {r['us']:.1f} | {r['gbs']:.0f} | {r['copy_gbs']:.0f} | {r['pct_copy']:.0f}% | "
            f"{r['baseline_us']:.1f} | {r['speedup']:.2f}x |"
        )
    summary = summarise(rows)
    lines += ["", "## Summary (medians over shapes and dtypes)", ""]
    lines += ["| op | median % copy | min % copy | median speedup | min speedup |", "|---|---:|---:|---:|---:|"]
    for op, v in summary.items():
        lines.append(
            f"| {op} | {v['median_pct_copy']:.0f}% | {v['min_pct_copy']:.0f}% | "
            f"{v['median_speedup']:.2f}x | {v['min_speedup']:.2f}x |"
        )
    big = [r for r in rows if r["mb"] >= 16]
    if big:
        lines += ["", "Shapes moving at least 16 MB (bandwidth-bound; smaller ones are launch-latency-bound):", ""]
        lines += ["| op | median % copy | min % copy | median speedup | min speedup |", "|---|---:|---:|---:|---:|"]
        for op, v in summarise(big).items():
            lines.append(
                f"| {op} | {v['median_pct_copy']:.0f}% | {v['min_pct_copy']:.0f}% | "
                f"{v['median_speedup']:.2f}x | {v['min_speedup']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def summarise(rows):
    out = {}
    for op in dict.fromkeys(r["op"] for r in rows):
        rs = [r for r in rows if r["op"] == op]
        out[op] = dict(
            median_pct_copy=statistics.median(r["pct_copy"] for r in rs),
            min_pct_copy=min(r["pct_copy"] for r in rs),
            median_speedup=statistics.median(r["speedup"] for r in rs),
            min_speedup=min(r["speedup"] for r in rs),
        )
    return out


COMPACT_CONFIGS = [
    dict(BLOCK_T=1, BLOCK_D=1024, num_warps=4),
    dict(BLOCK_T=2, BLOCK_D=4096, num_warps=4),
    dict(BLOCK_T=1, BLOCK_D=4096, num_warps=8),
]
RECYCLE_CONFIGS = [
    dict(BLOCK_M=16, BLOCK_D=128, num_warps=1),
    dict(BLOCK_M=32, BLOCK_D=128, num_warps=2),
    dict(BLOCK_M=16, BLOCK_D=256, num_warps=2),
    dict(BLOCK_M=16, BLOCK_D=1024, num_warps=4),
    dict(BLOCK_M=8, BLOCK_D=1024, num_warps=4),
    dict(BLOCK_M=8, BLOCK_D=2048, num_warps=8),
    dict(BLOCK_M=4, BLOCK_D=4096, num_warps=8),
    dict(BLOCK_M=8, BLOCK_D=4096, num_warps=16),
]


def tune(args):
    """Sweep block sizes of both kernels on a few shapes (bf16, D 4096); prints us per config."""
    from vtprune.kernels.triton_compact import compact_config, recycle_config, triton_compact, triton_recycle

    dtype = torch.bfloat16
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    results = []
    for B, N, K in [(8, 2880, 576), (8, 2880, 64), (1, 576, 64), (1, 2880, 192), (4, 576, 192)]:
        n_sets = max(1, min(args.max_sets, math.ceil(4 * l2 / op_bytes("compact", B, N, 4096, K, 2))))
        sets = [make_set(B, N, 4096, K, dtype, "cuda", seed) for seed in range(n_sets)]
        nbytes = op_bytes("compact", B, N, 4096, K, 2)
        print(f"compact B={B} N={N} K={K} default={compact_config(K, 4096, 2)}")
        for cfg in COMPACT_CONFIGS:
            t, _ = time_cuda([lambda s=s, c=cfg: triton_compact(s["x"], s["keep"], config=c) for s in sets], args.repeats)
            results.append(dict(op="compact", B=B, N=N, K=K, cfg=cfg, us=t, gbs=nbytes / t / 1e3))
            print(f"  {cfg}  {t:8.1f} us  {nbytes / t / 1e3:6.0f} GB/s", flush=True)
        for into in ("new", "kept"):
            nb = op_bytes("recycle-" + into, B, N, 4096, K, 2)
            default = recycle_config(4096, 2, into, R_SLOTS if into == "new" else K)
            print(f"recycle-{into} B={B} N={N} K={K} default={default}")
            for cfg in RECYCLE_CONFIGS:
                fns = [
                    lambda s=s, c=cfg, i=into: triton_recycle(*recycle_args(s, i)[0], **recycle_args(s, i)[1], config=c)
                    for s in sets
                ]
                t, _ = time_cuda(fns, args.repeats)
                results.append(dict(op="recycle-" + into, B=B, N=N, K=K, cfg=cfg, us=t, gbs=nb / t / 1e3))
                print(f"  {cfg}  {t:8.1f} us  {nb / t / 1e3:6.0f} GB/s", flush=True)
        del sets
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".tune.json").write_text(json.dumps(results, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="markdown table path; JSON written beside it")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats (median reported)")
    p.add_argument("--max-sets", type=int, default=32, help="most input sets cycled through to overflow L2")
    p.add_argument("--quick", action="store_true", help="fewer batch sizes")
    p.add_argument("--tune", action="store_true", help="sweep kernel block sizes instead (GPU only)")
    args = p.parse_args(argv)
    if args.tune:
        with torch.inference_mode():
            tune(args)
        return

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    use_triton = device == "cuda" and triton_available()
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    if device == "cpu":
        args.repeats = min(args.repeats, 5)
    rows = []
    with torch.inference_mode():
        for model, D, B, N, K in shapes(device, args.quick):
            for dtype in dtypes:
                rows += bench_shape(model, D, B, N, K, dtype, device, args, use_triton)
                if device == "cuda":
                    torch.cuda.empty_cache()
    triton_version = None
    if triton_available():
        import triton

        triton_version = triton.__version__
    meta = dict(
        device=torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        torch=torch.__version__,
        triton=triton_version,
        impl="triton" if use_triton else "torch",
        timing="CUDA events over CUDA-graph replays, median" if device == "cuda" else "perf_counter, median",
        repeats=args.repeats,
        r_slots=R_SLOTS,
        command=" ".join(sys.argv),
    )
    md = markdown(rows, meta)
    print()
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    args.out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, summary=summarise(rows), rows=rows), indent=1))


if __name__ == "__main__":
    main()
