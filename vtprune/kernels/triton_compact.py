"""Triton kernels for compaction (gather) and compaction + recycling (gather + weighted merge).

Layers: ``*_kernel`` (``@triton.jit``), launchers :func:`triton_compact` / :func:`triton_recycle`
that check shapes, dtypes, devices and layout before launching, and the public dispatchers in
:mod:`vtprune.kernels.compact` / :mod:`vtprune.kernels.recycle` (whose torch implementations are
the references). This module imports only :mod:`vtprune.kernels._common` from the package (the
dispatchers import it, lazily, never the reverse). Import it only when triton is installed.

Both kernels treat ``x`` as ``[Bx, N, D]`` with unit stride along D (trailing dims flattened) and any
batch/token strides; ``Bx == 1`` broadcasts through a zero batch stride. Rows whose token id lies
outside ``[0, N)`` are written as ``pad_value`` (the kernel never reads out of bounds; the torch
path raises instead), so out-of-range ids are a caller bug that only the torch path reports.

On a machine without a GPU the kernels run under the Triton interpreter when ``TRITON_INTERPRET=1``
is set before this module is imported; the launchers then accept CPU tensors.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from vtprune.kernels._common import (
    TRITON_COMPACT_DTYPES,
    TRITON_RECYCLE_DTYPES,
    KernelUnsupportedError,
    RecycleOutput,
    as_3d,
    build_slot_csr,
    check_compact_args,
    check_recycle_args,
    needs_grad,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def compact_kernel(
    x_ptr,
    idx_ptr,
    len_ptr,
    out_ptr,
    N,
    K,
    D,
    stride_xb,
    stride_xn,
    stride_ib,
    stride_ob,
    stride_on,
    pad_value,
    HAS_LENGTHS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, t, :] = x[b, idx[b, t], :] for t < len[b], else pad. Grid (cdiv(K, BLOCK_T), cdiv(D, BLOCK_D), B)."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_in = rows < K
    col_in = cols < D
    live = row_in
    if HAS_LENGTHS:
        live = live & (rows < tl.load(len_ptr + b))
    tok = tl.load(idx_ptr + b * stride_ib + rows, mask=live, other=0).to(tl.int64)
    live = live & (tok >= 0) & (tok < N)
    src = x_ptr + b * stride_xb + tok[:, None] * stride_xn + cols[None, :]
    vals = tl.load(src, mask=live[:, None] & col_in[None, :], other=pad_value)
    dst = out_ptr + b * stride_ob + rows[:, None].to(tl.int64) * stride_on + cols[None, :]
    tl.store(dst, vals, mask=row_in[:, None] & col_in[None, :])


@triton.jit
def recycle_kernel(
    x_ptr,
    keep_ptr,
    len_ptr,
    kw_ptr,
    mem_ptr,
    mw_ptr,
    off_ptr,
    out_ptr,
    N,
    K,
    R,
    D,
    stride_xb,
    stride_xn,
    stride_kb,
    stride_kwb,
    stride_mb,
    stride_offb,
    stride_ob,
    stride_on,
    pad_value,
    INTO_KEPT: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    HAS_KW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One output row x one block of D per program. Grid (rows_out, cdiv(D, BLOCK_D), B).

    Kept rows are copied; a slot row sums ``w * x`` over its members (CSR ``off``/``mem``/``mw``,
    BLOCK_M members per step) in float32 and divides by the summed weight.
    """
    row = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_in = cols < D
    if HAS_LENGTHS:
        n_keep = tl.load(len_ptr + b).to(tl.int32)
    else:
        n_keep = K
    is_kept = (row < n_keep) & (row < K)
    if INTO_KEPT:
        slot = row
        has_slot = is_kept
    else:
        slot = row - n_keep
        has_slot = (row >= n_keep) & (slot < R)
    tok = tl.load(keep_ptr + b * stride_kb + row, mask=is_kept, other=0).to(tl.int64)
    tok_ok = is_kept & (tok >= 0) & (tok < N)
    x_b = x_ptr + b * stride_xb
    base = tl.load(x_b + tok * stride_xn + cols, mask=col_in & tok_ok, other=pad_value)

    slot = tl.where(has_slot, slot, 0)
    start = tl.load(off_ptr + b * stride_offb + slot)
    end = tl.load(off_ptr + b * stride_offb + slot + 1)
    end = tl.where(has_slot, end, start)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    wacc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_in = ms < end
        mt = tl.load(mem_ptr + b * stride_mb + ms, mask=m_in, other=0).to(tl.int64)
        m_in = m_in & (mt >= 0) & (mt < N)
        mw = tl.load(mw_ptr + b * stride_mb + ms, mask=m_in, other=0.0)
        tile = tl.load(x_b + mt[:, None] * stride_xn + cols[None, :], mask=m_in[:, None] & col_in[None, :], other=0.0)
        acc += tl.sum(tile.to(tl.float32) * mw[:, None], axis=0)
        wacc += mw
    wsum = tl.sum(wacc, axis=0)

    if INTO_KEPT:
        if HAS_KW:
            kw = tl.load(kw_ptr + b * stride_kwb + row, mask=is_kept, other=1.0).to(tl.float32)
        else:
            kw = 1.0
        den = wsum + kw
        den = tl.where(den == 0.0, 1.0, den)
        merged = ((acc + kw * base.to(tl.float32)) / den).to(base.dtype)
        val = tl.where(end > start, merged, base)  # rows with nothing merged stay bit-exact copies
    else:
        den = tl.where(wsum == 0.0, 1.0, wsum)
        recycled = (acc / den).to(base.dtype)
        pad = tl.full([BLOCK_D], pad_value, dtype=base.dtype)
        val = tl.where(is_kept, base, tl.where(has_slot, recycled, pad))
    tl.store(out_ptr + b * stride_ob + row.to(tl.int64) * stride_on + cols, val, mask=col_in)


@triton.jit
def bucket_kernel(
    slot_ptr,
    midx_ptr,
    w_ptr,
    len_ptr,
    mem_out_ptr,
    w_out_ptr,
    off_out_ptr,
    M,
    S,
    stride_sb,
    stride_ib,
    stride_wb,
    stride_ob,
    stride_offb,
    LIMIT_BY_LEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Group one sample's merged tokens by slot (stable counting sort in registers). Grid (B,).

    Writes members/weights in slot order and ``off[b, s]`` = number of valid entries with slot < s,
    for s in [0, S]. Sort key ``slot * BLOCK_M + position`` is unique, so the order is stable.
    """
    b = tl.program_id(0).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    m_in = m < M
    slot = tl.load(slot_ptr + b * stride_sb + m, mask=m_in, other=-1).to(tl.int32)
    valid = m_in & (slot >= 0) & (slot < S)
    if LIMIT_BY_LEN:
        valid = valid & (slot < tl.load(len_ptr + b).to(tl.int32))
    key_slot = tl.where(valid, slot, S)
    key = tl.sort(key_slot * BLOCK_M + m)  # int32: (S + 1) * BLOCK_M < 2**31 by the size limits
    src = (key % BLOCK_M).to(tl.int32)
    src_in = src < M
    mid = tl.load(midx_ptr + b * stride_ib + src, mask=src_in, other=0).to(tl.int64)
    w = tl.load(w_ptr + b * stride_wb + src, mask=src_in, other=0.0).to(tl.float32)
    tl.store(mem_out_ptr + b * stride_ob + m, mid, mask=m_in)
    tl.store(w_out_ptr + b * stride_ob + m, w, mask=m_in)
    counts = tl.histogram(key_slot, BLOCK_S)
    offs = tl.cumsum(counts, 0) - counts
    s_idx = tl.arange(0, BLOCK_S)
    tl.store(off_out_ptr + b * stride_offb + s_idx, offs.to(tl.int32), mask=s_idx <= S)


# Largest merge list / slot count grouped by bucket_kernel in one program; beyond, torch.sort.
BUCKET_MAX_M = 8192
BUCKET_MAX_S = 4096


def bucket_slots(merge_index, merge_slot, merge_weight, num_slots: int, into: str, lengths, bucket_warps=None):
    """Triton equivalent of :func:`vtprune.kernels._common.build_slot_csr` (one launch)."""
    B, M = merge_index.shape
    if M == 0 or M > BUCKET_MAX_M or num_slots + 1 > BUCKET_MAX_S:
        return build_slot_csr(merge_index, merge_slot, merge_weight, num_slots, into, lengths)
    members = torch.empty((B, M), dtype=torch.int64, device=merge_index.device)
    weights = torch.empty((B, M), dtype=torch.float32, device=merge_index.device)
    offsets = torch.empty((B, num_slots + 1), dtype=torch.int32, device=merge_index.device)
    merge_slot, merge_index, merge_weight = merge_slot.contiguous(), merge_index.contiguous(), merge_weight.contiguous()
    block_m = max(16, _pow2(M))
    bucket_kernel[(B,)](
        merge_slot,
        merge_index,
        merge_weight,
        lengths if lengths is not None else merge_slot,
        members,
        weights,
        offsets,
        M,
        num_slots,
        merge_slot.stride(0),
        merge_index.stride(0),
        merge_weight.stride(0),
        members.stride(0),
        offsets.stride(0),
        LIMIT_BY_LEN=into == "kept" and lengths is not None,
        BLOCK_M=block_m,
        BLOCK_S=max(16, _pow2(num_slots + 1)),
        # one program sorts the whole list: more warps shorten it (H100: 47 us vs 69 us at 4096 with 16 vs 8)
        num_warps=bucket_warps or (16 if block_m >= 1024 else 8 if block_m >= 256 else 4),
    )
    return members, weights, offsets


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def compact_config(K: int, D: int, elem: int) -> dict:
    """Block sizes for :func:`compact_kernel`: ~16 KB tiles, full 16-byte vectors along D."""
    block_d = min(_pow2(D), 8192 // elem)
    block_t = max(1, min(_pow2(K), (16384 // elem) // block_d))
    return dict(BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)


def recycle_config(D: int, elem: int, into: str = "new", slots: int = 16) -> dict:
    """Block sizes for :func:`recycle_kernel` (swept on an H100, see docs/kernels.md).

    Narrow D blocks (one warp, 128 elements) give slot rows with long member lists more programs,
    which is what most shapes need; with many slots (into="kept", K >= 256) every row is short and
    wider blocks move more bytes per round trip.
    """
    if into == "kept" and slots >= 256:
        return dict(BLOCK_M=8, BLOCK_D=min(_pow2(D), 2048 // elem), num_warps=4)
    return dict(BLOCK_M=16, BLOCK_D=min(_pow2(D), 128), num_warps=1)


def _launch_checks(op: str, x: torch.Tensor, dtypes: tuple, *others: torch.Tensor | None) -> torch.Tensor:
    if not (x.is_cuda or INTERPRET):
        raise KernelUnsupportedError(
            f"{op}: the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before import), "
            f"got x on {x.device}; use backend='torch' on the CPU"
        )
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise KernelUnsupportedError(f"{op}: the Triton backend supports x of dtype {names}; got {x.dtype}")
    if needs_grad(x, *others):
        raise KernelUnsupportedError(
            f"{op}: an input requires grad and the Triton backend has no backward; "
            "use backend='torch' (or 'auto') for autograd, or call under torch.no_grad()"
        )
    x3 = as_3d(x)
    if x3 is None:
        raise KernelUnsupportedError(
            f"{op}: x of shape {tuple(x.shape)} with strides {x.stride()} cannot be viewed as "
            "[B, N, D] with unit stride along D; make the trailing dims contiguous (x.contiguous())"
        )
    return x3


def triton_compact(
    x: torch.Tensor,
    index: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    pad_value: float | int = 0,
    config: dict | None = None,
) -> torch.Tensor:
    """Launch :func:`compact_kernel`. Same contract as :func:`vtprune.kernels.compact_torch`.

    Args:
        x: ``[B|1, N, ...]``, trailing dims contiguous (unit stride along the flattened D).
        index: ``[B, K]`` int64/int32; lengths: optional ``[B]``; config: override block sizes.

    Returns:
        ``[B, K, ...]`` new contiguous tensor of ``x.dtype``.
    """
    op = "triton_compact"
    check_compact_args(x, index, lengths)
    x3 = _launch_checks(op, x, TRITON_COMPACT_DTYPES)
    B, K = index.shape
    N, D = x3.shape[1], x3.shape[2]
    out = torch.empty((B, K, D), dtype=x.dtype, device=x.device)
    if B * K * D == 0:
        return out.view(B, K, *x.shape[2:])
    index = index.contiguous()
    lens = lengths.contiguous() if lengths is not None else index  # dummy pointer when unused
    cfg = dict(config or compact_config(K, D, x.element_size()))
    num_warps = cfg.pop("num_warps", 4)
    grid = (triton.cdiv(K, cfg["BLOCK_T"]), triton.cdiv(D, cfg["BLOCK_D"]), B)
    pad = float(pad_value) if x.is_floating_point() else int(pad_value)
    compact_kernel[grid](
        x3,
        index,
        lens,
        out,
        N,
        K,
        D,
        x3.stride(0) if x3.shape[0] > 1 else 0,
        x3.stride(1),
        index.stride(0),
        out.stride(0),
        out.stride(1),
        pad,
        HAS_LENGTHS=lengths is not None,
        num_warps=num_warps,
        **cfg,
    )
    return out.view(B, K, *x.shape[2:])


def triton_recycle(
    x: torch.Tensor,
    keep_index: torch.Tensor,
    merge_index: torch.Tensor,
    merge_slot: torch.Tensor,
    merge_weight: torch.Tensor,
    *,
    into: str = "new",
    num_slots: int | None = None,
    keep_weight: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    pad_value: float = 0.0,
    config: dict | None = None,
) -> RecycleOutput:
    """Launch :func:`recycle_kernel`. Same contract as :func:`vtprune.kernels.recycle_torch`.

    The merged tokens are first grouped by slot on the device (:func:`build_slot_csr`: a sort of
    the ``[B, M]`` slot ids and a searchsorted, no host sync), then one launch writes every
    output row: kept rows as copies, slot rows as float32 weighted means.
    """
    op = "triton_recycle"
    S = check_recycle_args(x, keep_index, merge_index, merge_slot, merge_weight, into, num_slots, keep_weight, lengths)
    x3 = _launch_checks(op, x, TRITON_RECYCLE_DTYPES, merge_weight, keep_weight)
    B, K = keep_index.shape
    N, D = x3.shape[1], x3.shape[2]
    R = S if into == "new" else 0
    rows_out = K + R
    out = torch.empty((B, rows_out, D), dtype=x.dtype, device=x.device)
    if lengths is None:
        out_len = torch.full((B,), K + R, dtype=torch.long, device=x.device)
    else:
        out_len = lengths.long() + R
    if B * rows_out * D == 0:
        return RecycleOutput(out.view(B, rows_out, *x.shape[2:]), out_len)
    members, weights, offsets = bucket_slots(merge_index, merge_slot, merge_weight, S, into, lengths)
    keep_index = keep_index.contiguous()
    kw = keep_weight.contiguous() if keep_weight is not None else keep_index  # dummy when unused
    lens = lengths.contiguous() if lengths is not None else keep_index
    cfg = dict(config or recycle_config(D, x.element_size(), into, S))
    num_warps = cfg.pop("num_warps", 4)
    grid = (rows_out, triton.cdiv(D, cfg["BLOCK_D"]), B)
    recycle_kernel[grid](
        x3,
        keep_index,
        lens,
        kw,
        members,
        weights,
        offsets,
        out,
        N,
        K,
        R,
        D,
        x3.stride(0) if x3.shape[0] > 1 else 0,
        x3.stride(1),
        keep_index.stride(0),
        kw.stride(0),
        members.stride(0),
        offsets.stride(0),
        out.stride(0),
        out.stride(1),
        float(pad_value),
        INTO_KEPT=into == "kept",
        HAS_LENGTHS=lengths is not None,
        HAS_KW=keep_weight is not None,
        num_warps=num_warps,
        **cfg,
    )
    return RecycleOutput(out.view(B, rows_out, *x.shape[2:]), out_len)
