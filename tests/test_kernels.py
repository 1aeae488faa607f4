"""Compaction kernels: torch reference semantics, Triton kernels (interpreter on CPU, CUDA on a GPU).

The Triton interpreter must be switched on (TRITON_INTERPRET=1) before the kernels are defined, so
the interpreter cases run in one subprocess (this file run as a script with ``--interp-worker``)
that reports a JSON line per case; the parametrised tests below read those results. The main test
process never sets TRITON_INTERPRET, so other test files are unaffected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from vtprune.kernels import (
    ENV_BACKEND,
    ENV_TRITON_MIN_ELEMENTS,
    KernelUnsupportedError,
    RecycleOutput,
    compact,
    compact_torch,
    lengths_to_mask,
    recycle,
    recycle_torch,
    triton_available,
    triton_min_elements,
    use_triton,
)
from vtprune.kernels._common import TRITON_MIN_ELEMENTS

pytestmark = pytest.mark.transformers4  # pure torch: runs in the transformers 4.37 environment too

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Small odd shapes: N and K not powers of two, D = 80 (kernels mask the tail of a 128-wide block).
N, D, K, R = 37, 80, 13, 5


# ----------------------------------------------------------------------------------------------
# Inputs and checks shared by the CPU, interpreter and GPU tests
# ----------------------------------------------------------------------------------------------


def _inputs(B: int, dtype: torch.dtype, device="cpu", seed: int = 0, n=N, d=D, k=K):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=g).to(dtype)
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(B)])
    keep, pruned = perm[:, :k], perm[:, k:]
    lengths = torch.randint(0, k + 1, (B,), generator=g)
    lengths[0] = k  # one full row, the others ragged
    to = lambda t: t.to(device)  # noqa: E731
    return to(x), to(keep), to(pruned), to(lengths), g


def _naive_compact(x, index, lengths=None, pad=0):
    B, Kk = index.shape
    out = torch.full((B, Kk, *x.shape[2:]), pad, dtype=x.dtype)
    for b in range(B):
        for i in range(Kk):
            if lengths is None or i < lengths[b]:
                out[b, i] = x[b if x.shape[0] > 1 else 0, index[b, i]]
    return out


def _naive_recycle(x, keep, merge, slot, w, into, num_slots=None, kw=None, lengths=None, pad=0.0):
    """Per-row loops in float64: the slow, obvious definition."""
    x = x.double()
    B, Kk = keep.shape
    lens = [Kk] * B if lengths is None else [int(v) for v in lengths]
    rows_out = Kk + (num_slots if into == "new" else 0)
    out = torch.full((B, rows_out, x.shape[2]), float(pad), dtype=torch.float64)
    for b in range(B):
        xb = x[b if x.shape[0] > 1 else 0]
        nslot = num_slots if into == "new" else lens[b]
        num = torch.zeros(max(nslot, 0), x.shape[2], dtype=torch.float64)
        den = torch.zeros(max(nslot, 0), dtype=torch.float64)
        cnt = [0] * max(nslot, 0)
        for m in range(merge.shape[1]):
            s = int(slot[b, m])
            if 0 <= s < nslot:
                num[s] += float(w[b, m]) * xb[merge[b, m]]
                den[s] += float(w[b, m])
                cnt[s] += 1
        for i in range(lens[b]):
            out[b, i] = xb[keep[b, i]]
        for s in range(nslot):
            if into == "new":
                out[b, lens[b] + s] = num[s] / den[s] if den[s] != 0 else 0.0
            elif cnt[s]:
                kws = 1.0 if kw is None else float(kw[b, s])
                out[b, s] = (num[s] + kws * xb[keep[b, s]]) / (den[s] + kws)
    return out


def _recycle_case(B, dtype, into, ragged, seed, device="cpu", n=N, d=D, k=K, r=R):
    x, keep, pruned, lengths, g = _inputs(B, dtype, device, seed, n, d, k)
    M = pruned.shape[1]
    hi = r if into == "new" else k
    slot = torch.randint(-1, hi, (B, M), generator=g).to(device)  # -1: not merged
    w = (torch.rand(B, M, generator=g) + 0.1).to(device)
    kw = (torch.rand(B, k, generator=g) + 0.5).to(device) if into == "kept" else None
    kwargs = dict(into=into, num_slots=r if into == "new" else None, keep_weight=kw)
    kwargs["lengths"] = lengths if ragged else None
    return (x, keep, pruned, slot, w), kwargs


def _check_recycle_close(got: RecycleOutput, args, kwargs):
    """Compare with a float64 reference; tolerance from the same-dtype torch path's own error."""
    x = args[0]
    ref64 = recycle_torch(x.double(), *args[1:4], args[4].double(), **_double_kw(kwargs))
    same = recycle_torch(*args, **kwargs)
    assert got.out.shape == same.out.shape and got.out.dtype == x.dtype
    assert torch.equal(got.lengths.cpu(), same.lengths.cpu())
    err_torch = (same.out.double() - ref64.out).abs().max().item()
    err = (got.out.double() - ref64.out).abs().max().item()
    eps = torch.finfo(x.dtype).eps
    tol = 2 * err_torch + 4 * eps * max(1.0, ref64.out.abs().max().item())
    assert err <= tol, f"max error {err:.3g} vs float64 reference > tolerance {tol:.3g} (torch: {err_torch:.3g})"
    # kept rows that nothing merged into are bit-exact copies, as is the padding
    mask = lengths_to_mask(got.lengths, got.out.shape[1])
    assert torch.equal(got.out[~mask], same.out[~mask])
    if kwargs["into"] == "new":
        lens = kwargs["lengths"] if kwargs["lengths"] is not None else torch.full_like(got.lengths, args[1].shape[1])
        kept_rows = lengths_to_mask(lens, got.out.shape[1])
        assert torch.equal(got.out[kept_rows], same.out[kept_rows])


def _double_kw(kwargs):
    kw = dict(kwargs)
    if kw.get("keep_weight") is not None:
        kw["keep_weight"] = kw["keep_weight"].double()
    return kw


# ----------------------------------------------------------------------------------------------
# Torch reference semantics (CPU, main process)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_compact_torch_matches_naive(B, dtype):
    x, keep, _, lengths, _ = _inputs(B, dtype)
    assert torch.equal(compact_torch(x, keep), _naive_compact(x, keep))
    got = compact_torch(x, keep, lengths=lengths, pad_value=-7)
    assert torch.equal(got, _naive_compact(x, keep, lengths, pad=-7))
    assert torch.equal(compact(x, keep.int()), compact_torch(x, keep))


def test_compact_broadcast_and_position_ids():
    x, keep, _, lengths, _ = _inputs(3, torch.float32)
    cos = torch.randn(1, N, 16)
    assert torch.equal(compact(cos, keep), _naive_compact(cos, keep))
    pos = torch.arange(N).expand(3, N).contiguous()
    assert torch.equal(compact(pos, keep), keep)
    got = compact(pos, keep, lengths=lengths, pad_value=0)
    assert torch.equal(got, torch.where(lengths_to_mask(lengths, K), keep, 0))


def test_lengths_to_mask_is_prefix():
    m = lengths_to_mask(torch.tensor([0, 2, 4]), 4)
    assert m.tolist() == [[False] * 4, [True, True, False, False], [True] * 4]


@pytest.mark.parametrize("into", ["new", "kept"])
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("B", [1, 3])
def test_recycle_torch_matches_naive(into, ragged, B):
    args, kwargs = _recycle_case(B, torch.float64, into, ragged, seed=B)
    res = recycle_torch(*args, **kwargs)
    ref = _naive_recycle(*args, into=into, num_slots=kwargs["num_slots"], kw=kwargs["keep_weight"], lengths=kwargs["lengths"])
    torch.testing.assert_close(res.out, ref, rtol=1e-12, atol=1e-12)
    base = kwargs["lengths"] if ragged else torch.full((B,), K)
    assert torch.equal(res.lengths, base + (R if into == "new" else 0))


def test_recycle_layout_new_unragged_is_cat():
    args, kwargs = _recycle_case(2, torch.float32, "new", False, seed=3)
    res = recycle(*args, **kwargs)
    assert res.out.shape == (2, K + R, D)
    assert torch.equal(res.out[:, :K], compact_torch(args[0], args[1]))


def test_recycle_empty_slot_is_zero_and_kept_without_members_is_exact():
    x = torch.randn(1, 6, 4)
    keep = torch.tensor([[0, 1]])
    merge = torch.tensor([[2, 3, 4, 5]])
    w = torch.tensor([[1.0, 3.0, 1.0, 1.0]])
    new = recycle(x, keep, merge, torch.tensor([[0, 0, -1, 2]]), w, num_slots=3)
    torch.testing.assert_close(new.out[0, 2], (x[0, 2] + 3 * x[0, 3]) / 4)
    assert torch.equal(new.out[0, 3], torch.zeros(4))  # slot 1: no member
    torch.testing.assert_close(new.out[0, 4], x[0, 5])
    kept = recycle(x, keep, merge, torch.tensor([[1, -1, 7, 1]]), w, into="kept")
    assert torch.equal(kept.out[0, 0], x[0, 0])
    torch.testing.assert_close(kept.out[0, 1], (x[0, 1] + x[0, 2] + x[0, 5]) / 3)


def test_torch_path_supports_autograd():
    x = torch.randn(2, N, D, requires_grad=True)
    _, keep, pruned, _, g = _inputs(2, torch.float32)
    compact(x, keep).sum().backward()
    expect = torch.zeros(2, N)
    expect.scatter_(1, keep, 1.0)
    assert torch.equal(x.grad[..., 0], expect)
    x.grad = None
    w = torch.rand(2, pruned.shape[1], requires_grad=True)
    slot = torch.randint(0, R, pruned.shape, generator=g)
    recycle(x, keep, pruned, slot, w, num_slots=R).out.square().sum().backward()
    assert x.grad is not None and w.grad is not None and torch.isfinite(w.grad).all()


def test_backend_selection(monkeypatch):
    x, keep, _, _, _ = _inputs(1, torch.float32)
    with pytest.raises(ValueError, match="backend argument must be one of"):
        compact(x, keep, backend="cuda")
    monkeypatch.setenv(ENV_BACKEND, "fast")
    with pytest.raises(ValueError, match="environment variable VTPRUNE_KERNEL_BACKEND"):
        compact(x, keep)
    monkeypatch.setenv(ENV_BACKEND, "torch")
    assert torch.equal(compact(x, keep), compact_torch(x, keep))
    assert torch.equal(compact(x, keep, backend="auto"), compact_torch(x, keep))  # CPU: torch


def test_auto_threshold_decision(monkeypatch):
    monkeypatch.delenv(ENV_TRITON_MIN_ELEMENTS, raising=False)
    assert TRITON_MIN_ELEMENTS == {"compact": 1 << 20, "recycle": 1 << 16}
    assert triton_min_elements() == triton_min_elements("compact") == 1 << 20
    assert triton_min_elements("recycle") == 1 << 16
    # a position-id vector stays on torch, a LLaVA-sized hidden-state gather goes to Triton
    assert not use_triton(100)
    assert not use_triton((1 << 20) - 1)
    assert use_triton(1 << 20) and use_triton(8 * 576 * 4096)
    assert not use_triton((1 << 16) - 1, op="recycle") and use_triton(1 << 16, op="recycle")
    # an input the kernel cannot take never goes to Triton, however large
    assert not use_triton(1 << 30, "triton cannot be imported")
    assert use_triton(5, min_elements=5) and not use_triton(4, min_elements=5)
    with pytest.raises(ValueError, match="no Triton threshold for op 'gather'"):
        use_triton(1 << 30, op="gather")


def test_auto_threshold_env_override(monkeypatch):
    monkeypatch.setenv(ENV_TRITON_MIN_ELEMENTS, "1000")
    assert triton_min_elements() == triton_min_elements("recycle") == 1000  # one value for both ops
    assert use_triton(1000) and not use_triton(999, op="recycle")
    monkeypatch.setenv(ENV_TRITON_MIN_ELEMENTS, "0")  # every fitting CUDA input
    assert use_triton(1) and use_triton(0, op="recycle")
    monkeypatch.setenv(ENV_TRITON_MIN_ELEMENTS, " ")  # blank: the default
    assert triton_min_elements() == 1 << 20
    assert use_triton(2000, min_elements=2000)  # an explicit argument wins over the environment
    for bad in ("many", "-1", "1.5e6"):
        monkeypatch.setenv(ENV_TRITON_MIN_ELEMENTS, bad)
        with pytest.raises(ValueError, match="VTPRUNE_TRITON_MIN_ELEMENTS must be a non-negative integer"):
            triton_min_elements()


def test_auto_dispatch_follows_the_threshold(monkeypatch):
    """The dispatchers route by output size: pretend the inputs fit the kernel and stand in a fake
    Triton module that records its calls (no GPU needed)."""
    import importlib
    import types

    compact_mod = importlib.import_module("vtprune.kernels.compact")  # the package's `compact` is the function
    recycle_mod = importlib.import_module("vtprune.kernels.recycle")

    calls = []
    fake = types.ModuleType("vtprune.kernels.triton_compact")
    fake.triton_compact = lambda x, index, **kw: calls.append("compact") or compact_torch(x, index, **kw)
    fake.triton_recycle = lambda *a, **kw: calls.append("recycle") or recycle_torch(*a, **kw)
    monkeypatch.setitem(sys.modules, "vtprune.kernels.triton_compact", fake)
    monkeypatch.setattr(compact_mod, "_triton_compact_reason", lambda *a: None)
    monkeypatch.setattr(recycle_mod, "_triton_recycle_reason", lambda *a: None)
    common = importlib.import_module("vtprune.kernels._common")
    monkeypatch.setattr(common, "triton_available", lambda: True)  # a forced backend checks it first
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    x, keep, pruned, _, g = _inputs(2, torch.float32)  # compact output 2 x 13 x 80 = 2080 elements
    slot = torch.randint(0, R, pruned.shape, generator=g)
    w = torch.rand(pruned.shape, generator=g)
    monkeypatch.delenv(ENV_TRITON_MIN_ELEMENTS, raising=False)
    assert torch.equal(compact(x, keep), compact_torch(x, keep))
    recycle(x, keep, pruned, slot, w, num_slots=R)
    assert calls == []  # below both defaults: torch
    monkeypatch.setenv(ENV_TRITON_MIN_ELEMENTS, str(2 * K * D))
    compact(x, keep)
    recycle(x, keep, pruned, slot, w, num_slots=R)  # [2, K + R, D]: above
    recycle(x, keep, pruned, slot % K, w, into="kept")  # [2, K, D]: exactly at the threshold
    assert calls == ["compact", "recycle", "recycle"]
    monkeypatch.setenv(ENV_TRITON_MIN_ELEMENTS, str(2 * K * D + 1))
    compact(x, keep)
    recycle(x, keep, pruned, slot % K, w, into="kept")
    recycle(x, keep, pruned, slot, w, num_slots=R)
    assert calls == ["compact", "recycle", "recycle", "recycle"]
    compact(x, keep, backend="triton")  # a forced backend ignores the threshold
    compact(x, keep, backend="torch")
    assert calls[-1] == "compact" and len(calls) == 5


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_forced_triton_on_cpu_is_refused_clearly(monkeypatch):
    x, keep, pruned, _, _ = _inputs(1, torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelUnsupportedError, match="needs CUDA tensors"):
        compact(x, keep, backend="triton")
    monkeypatch.setenv(ENV_BACKEND, "triton")
    slot = torch.zeros_like(pruned)
    with pytest.raises(KernelUnsupportedError, match="needs CUDA tensors"):
        recycle(x, keep, pruned, slot, torch.ones(pruned.shape), num_slots=1)


@pytest.mark.parametrize(
    "call, exc, msg",
    [
        (lambda x, i: compact(x[0, 0], i), ValueError, r"x must be \[batch, tokens"),
        (lambda x, i: compact(x, i[0]), ValueError, r"index must be \[batch, kept\]"),
        (lambda x, i: compact(x, i.float()), TypeError, "index must be an integer tensor"),
        (lambda x, i: compact(x.expand(2, -1, -1), i.expand(3, -1)), ValueError, "must be 1 or match"),
        (lambda x, i: compact(x, i.to("meta")), ValueError, "move them to one device"),
        (lambda x, i: compact(x, i, lengths=torch.tensor([1, 2])), ValueError, r"lengths must be \[batch\]"),
        (lambda x, i: compact(x, i, lengths=torch.tensor([1.0])), TypeError, "lengths must be an integer"),
        (lambda x, i: recycle(x.long(), i, i, i, i.float(), num_slots=1), TypeError, "must be a floating tensor"),
        (lambda x, i: recycle(x, i, i, i[:, :2], i.float(), num_slots=1), ValueError, "merge_slot must have"),
        (lambda x, i: recycle(x, i, i, i, i.float()[:, :2], num_slots=1), ValueError, "merge_weight must be"),
        (lambda x, i: recycle(x, i, i, i, i, num_slots=1), TypeError, "merge_weight must be a floating"),
        (lambda x, i: recycle(x, i, i, i, i.float()), ValueError, "needs num_slots"),
        (lambda x, i: recycle(x, i, i, i, i.float(), into="both"), ValueError, "into must be 'new' or 'kept'"),
        (lambda x, i: recycle(x, i, i, i, i.float(), into="kept", num_slots=2), ValueError, "num_slots must be None"),
        (
            lambda x, i: recycle(x, i, i, i, i.float(), num_slots=1, keep_weight=i.float()),
            ValueError,
            "keep_weight only applies",
        ),
        (
            lambda x, i: recycle(x, i, i, i, i.float(), into="kept", keep_weight=i.float()[:, :1]),
            ValueError,
            r"keep_weight must be \[batch, kept\]",
        ),
    ],
)
def test_error_messages(call, exc, msg):
    x = torch.randn(1, N, D)
    i = torch.arange(K).unsqueeze(0)
    with pytest.raises(exc, match=msg):
        call(x, i)


def _subprocess_env():
    # the checkout's root goes after any PYTHONPATH the test run was given
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(ROOT)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    env.pop(ENV_BACKEND, None)
    return env


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from vtprune.kernels import compact, compact_torch, triton_available\n"
        "assert not triton_available()\n"
        "x = torch.randn(2, 5, 3); i = torch.tensor([[4, 0], [1, 1]])\n"
        "assert torch.equal(compact(x, i), compact_torch(x, i))\n"
        "try:\n"
        "    compact(x, i, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton cannot be imported' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = _subprocess_env()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (CPU), in one subprocess
# ----------------------------------------------------------------------------------------------


def _case_compact(dtype, B):
    from vtprune.kernels.triton_compact import triton_compact

    x, keep, _, lengths, _ = _inputs(B, dtype, seed=10 + B)
    assert torch.equal(triton_compact(x, keep), compact_torch(x, keep))
    got = triton_compact(x, keep.int(), lengths=lengths, pad_value=-2.5)
    assert torch.equal(got, compact_torch(x, keep, lengths=lengths, pad_value=-2.5))
    # RoPE cos/sin with a batch of 1 broadcast over the index batch, and a strided (sliced) x
    cos = torch.randn(1, N, 16).to(dtype)
    assert torch.equal(triton_compact(cos, keep), compact_torch(cos, keep))
    wide = torch.randn(B, N + 4, D + 8).to(dtype)[:, 2 : N + 2, :D]
    assert torch.equal(triton_compact(wide, keep), compact_torch(wide, keep))
    # through the public dispatcher
    assert torch.equal(compact(x, keep, backend="triton"), compact_torch(x, keep))


def _case_compact_ints(B):
    from vtprune.kernels.triton_compact import triton_compact

    _, keep, _, lengths, _ = _inputs(B, torch.float32, seed=20 + B)
    pos = (torch.arange(N) + 100).expand(B, N).contiguous()
    assert torch.equal(triton_compact(pos, keep), compact_torch(pos, keep))
    got = triton_compact(pos, keep, lengths=lengths, pad_value=0)
    assert torch.equal(got, compact_torch(pos, keep, lengths=lengths, pad_value=0))


def _case_recycle(dtype, B, into, ragged):
    from vtprune.kernels.triton_compact import triton_recycle

    args, kwargs = _recycle_case(B, dtype, into, ragged, seed=30 + B)
    _check_recycle_close(triton_recycle(*args, **kwargs), args, kwargs)


def _case_refusals():
    from vtprune.kernels.triton_compact import triton_compact, triton_recycle

    x, keep, pruned, _, _ = _inputs(1, torch.float32)
    for fn, a in (
        (triton_compact, (x.requires_grad_(),)),
        (triton_recycle, (x, pruned, torch.zeros_like(pruned), torch.ones(pruned.shape))),
    ):
        kw = {"num_slots": 1} if fn is triton_recycle else {}
        try:
            fn(a[0], keep, *a[1:], **kw)
        except KernelUnsupportedError as e:
            assert "requires grad" in str(e), e
        else:
            raise AssertionError(f"{fn.__name__} accepted an input that requires grad")
    with torch.no_grad():  # fine without autograd recording
        triton_compact(x, keep)
    try:
        triton_compact(torch.randn(1, N, 4, 6).transpose(2, 3), keep)
    except KernelUnsupportedError as e:
        assert "unit stride along D" in str(e), e
    else:
        raise AssertionError("non-contiguous trailing dims accepted")
    try:
        triton_recycle(x.detach().double(), keep, pruned, torch.zeros_like(pruned), torch.ones(pruned.shape), num_slots=1)
    except KernelUnsupportedError as e:
        assert "supports x of dtype" in str(e), e
    else:
        raise AssertionError("float64 accepted by the recycle kernel")


def _interp_cases():
    cases = {}
    for name, dt in DTYPES.items():
        for B in (1, 3):
            cases[f"compact-{name}-B{B}"] = (_case_compact, (dt, B))
            for into in ("new", "kept"):
                # ragged lengths on the batch of 3 (the batch of 1 keeps all of its row)
                cases[f"recycle-{into}-{name}-B{B}"] = (_case_recycle, (dt, B, into, B == 3))
    for B in (1, 3):
        cases[f"compact-int64-B{B}"] = (_case_compact_ints, (B,))
    cases["refusals"] = (_case_refusals, ())
    return cases


INTERP_CASES = sorted(_interp_cases())


def _interp_worker() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from vtprune.kernels import triton_compact as tc

    assert tc.INTERPRET
    for name, (fn, args) in sorted(_interp_cases().items()):
        try:
            fn(*args)
            res = {"case": name, "ok": True}
        except Exception:
            res = {"case": name, "ok": False, "detail": traceback.format_exc(limit=6)}
        print("RESULT " + json.dumps(res), flush=True)


@pytest.fixture(scope="module")
def interp_results():
    if not triton_available():
        pytest.skip("triton not installed")
    env = {**_subprocess_env(), "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--interp-worker"], env=env, capture_output=True, text=True, timeout=300
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT ") :])
            results[r["case"]] = r
    if proc.returncode != 0 or not results:
        pytest.fail(f"interpreter worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return results


@pytest.mark.parametrize("case", INTERP_CASES)
def test_triton_interpreter(case, interp_results):
    res = interp_results.get(case)
    assert res is not None, f"case {case} did not report"
    assert res["ok"], res.get("detail")


# ----------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ----------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs CUDA + triton")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("B, n, d, k", [(1, 576, 4096, 64), (3, 2880, 3584, 577), (2, 1001, 80, 333)])
def test_cuda_compact_bit_exact(dtype, B, n, d, k):
    x, keep, _, lengths, _ = _inputs(B, dtype, "cuda", seed=5, n=n, d=d, k=k)
    out = compact(x, keep)  # auto: Triton on CUDA
    assert torch.equal(out, compact_torch(x, keep))
    assert torch.equal(compact(x, keep, lengths=lengths, backend="triton"), compact_torch(x, keep, lengths=lengths))
    cos = torch.randn(1, n, 128, device="cuda").to(dtype)
    assert torch.equal(compact(cos, keep, backend="triton"), compact_torch(cos, keep))
    pos = torch.arange(n, device="cuda").expand(B, n).contiguous()
    assert torch.equal(compact(pos, keep, backend="triton"), keep)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("into", ["new", "kept"])
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("n, d, k, r", [(2880, 3584, 577, 17), (9000, 80, 100, 7)], ids=["bucket", "sort"])
def test_cuda_recycle_close(dtype, into, ragged, n, d, k, r):
    # 2880 tokens: slots grouped by bucket_kernel; 9000: too many for one program, torch.sort path
    args, kwargs = _recycle_case(3, dtype, into, ragged, seed=7, device="cuda", n=n, d=d, k=k, r=r)
    _check_recycle_close(recycle(*args, **kwargs, backend="triton"), args, kwargs)


if __name__ == "__main__" and "--interp-worker" in sys.argv:
    _interp_worker()
