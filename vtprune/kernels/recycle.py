"""Compaction with recycling: keep some tokens and merge the pruned ones as weighted means, in one pass.

Two targets, both weighted means with caller-given weights:

- ``into="new"``: the merged tokens form ``R`` new tokens (VisionZip's contextual tokens,
  SparseVLM's clusters). Slot ``r`` becomes ``sum_m w_m x[m] / sum_m w_m`` over the merged tokens
  ``m`` assigned to it (``merge_slot == r``); a slot with no member (or zero total weight) is zeros.
- ``into="kept"``: each merged token joins a kept token (VFlowOpt-style). Kept row ``i`` becomes
  ``(kw_i x[keep_i] + sum_m w_m x[m]) / (kw_i + sum_m w_m)`` over the merged tokens with
  ``merge_slot == i`` (``kw`` = ``keep_weight``, default 1). Kept rows that receive nothing are
  bit-exact copies.

``merge_slot`` entries that are negative or out of range (``>= R``; ``>= lengths[b]`` or ``>= K``
for ``into="kept"``) are ignored: use ``-1`` to pad a ragged merge list. Sums run in float32
(float64 for float64 inputs on the torch path), and the result is cast to ``x.dtype``.

Output layout (``K = keep_index.shape[1]``, ``len_b = lengths[b]`` or ``K``):

- ``into="new"``: ``out`` is ``[B, K + R, ...]``; row ``b`` holds its ``len_b`` kept tokens, then
  its ``R`` recycled tokens (slot order), then ``pad_value`` in rows ``len_b + R:``. The returned
  ``lengths`` are ``len_b + R``. Without ragged lengths that is simply ``cat([kept, recycled], 1)``.
- ``into="kept"``: ``out`` is ``[B, K, ...]`` with ``pad_value`` in rows ``len_b:``; returned
  ``lengths`` are ``len_b``.

In both cases the valid rows are a prefix, so ``lengths_to_mask(result.lengths, out.shape[1])`` is
the mask of the output. Positions (RoPE cos/sin, position ids) of recycled tokens are the caller's
choice; gather the kept ones with :func:`vtprune.kernels.compact`.
"""

from __future__ import annotations

import math

import torch

from vtprune.kernels._common import (
    TRITON_RECYCLE_DTYPES,
    RecycleOutput,
    as_3d,
    build_slot_csr,
    check_recycle_args,
    needs_grad,
    requested_backend,
    slot_validity,
    triton_available,
    use_triton,
)
from vtprune.kernels.compact import compact_torch

__all__ = ["RecycleOutput", "build_slot_csr", "recycle", "recycle_torch"]  # the first two live in _common


def recycle_torch(
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
) -> RecycleOutput:
    """Reference implementation of :func:`recycle` (torch indexing + scatter_add; differentiable)."""
    S = check_recycle_args(x, keep_index, merge_index, merge_slot, merge_weight, into, num_slots, keep_weight, lengths)
    B, K = keep_index.shape
    trailing = x.shape[2:]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    kept = compact_torch(x, keep_index, lengths=lengths, pad_value=pad_value).reshape(B, K, -1)
    D = kept.shape[2]
    xb = x.expand(B, *x.shape[1:]) if x.shape[0] == 1 else x
    batch = torch.arange(B, device=x.device).unsqueeze(1)
    rows = xb[batch, merge_index.long()].reshape(B, merge_index.shape[1], D).to(acc_dtype)

    slot, valid = slot_validity(merge_slot, S, into, lengths)
    key = torch.where(valid, slot, S)  # invalid entries land in a spare slot S that is dropped
    w = torch.where(valid, merge_weight.to(acc_dtype), 0)
    acc = torch.zeros(B, S + 1, D, dtype=acc_dtype, device=x.device)
    acc = acc.scatter_add(1, key.unsqueeze(2).expand(-1, -1, D), rows * w.unsqueeze(2))[:, :S]
    wsum = torch.zeros(B, S + 1, dtype=acc_dtype, device=x.device).scatter_add(1, key, w)[:, :S]
    count = torch.zeros(B, S + 1, dtype=torch.long, device=x.device)
    count = count.scatter_add(1, key, valid.long())[:, :S]

    if into == "kept":
        kw = torch.ones(B, K, dtype=acc_dtype, device=x.device) if keep_weight is None else keep_weight.to(acc_dtype)
        num = acc + kw.unsqueeze(2) * kept.to(acc_dtype)
        den = wsum + kw
        merged = (num / torch.where(den == 0, 1, den).unsqueeze(2)).to(x.dtype)
        out = torch.where((count > 0).unsqueeze(2), merged, kept)
        out_len = (
            torch.full((B,), K, dtype=torch.long, device=x.device) if lengths is None else lengths.long()
        )
    else:
        slots = (acc / torch.where(wsum == 0, 1, wsum).unsqueeze(2)).to(x.dtype)
        if lengths is None:
            out = torch.cat([kept, slots], dim=1)
            out_len = torch.full((B,), K + S, dtype=torch.long, device=x.device)
        else:
            pad = torch.full((B, S, D), pad_value, dtype=x.dtype, device=x.device)
            out = torch.cat([kept, pad], dim=1)
            pos = lengths.long().unsqueeze(1) + torch.arange(S, device=x.device)
            out = out.scatter(1, pos.unsqueeze(2).expand(-1, -1, D), slots)
            out_len = lengths.long() + S
    return RecycleOutput(out.reshape(B, out.shape[1], *trailing), out_len)


def _triton_recycle_reason(x: torch.Tensor, *tensors: torch.Tensor | None) -> str | None:
    if not triton_available():
        return "triton cannot be imported"
    if not all(t.is_cuda for t in (x, *tensors) if t is not None):
        return f"the Triton kernel runs on CUDA tensors, got x on {x.device}"
    if x.dtype not in TRITON_RECYCLE_DTYPES:
        return f"dtype {x.dtype} is not supported by the Triton recycle kernel"
    if needs_grad(x, *tensors):
        return "an input requires grad; the Triton kernel has no backward (use the torch backend)"
    if as_3d(x) is None:
        return f"x of shape {tuple(x.shape)} and strides {x.stride()} has non-contiguous trailing dims"
    return None


def recycle(
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
    backend: str | None = None,
) -> RecycleOutput:
    """Keep tokens and merge pruned ones (weighted means) in one pass; see the module docstring.

    Args:
        x: ``[B|1, N, ...]`` floating tensor (a batch of 1 broadcasts).
        keep_index: ``[B, K]`` int token ids of the kept tokens (only the first ``lengths[b]`` used).
        merge_index: ``[B, M]`` int token ids of the tokens to merge (usually the pruned ones).
        merge_slot: ``[B, M]`` int target of each merged token: a slot in ``[0, R)`` for
            ``into="new"``, a position in ``keep_index`` (``[0, K)``) for ``into="kept"``;
            negative = not merged.
        merge_weight: ``[B, M]`` float weight of each merged token (non-negative).
        into: ``"new"`` (R recycled tokens appended after the kept ones) or ``"kept"``.
        num_slots: R, required for ``into="new"``.
        keep_weight: ``[B, K]`` float weight of each kept token in its own mean (``into="kept"``).
        lengths: ``[B]`` int number of kept tokens per sample (ragged batch), else all K.
        pad_value: fill of padded output rows.
        backend: as in :func:`vtprune.kernels.compact`; ``"auto"`` takes Triton from
            ``triton_min_elements("recycle")`` output elements (default 1 << 16).

    Returns:
        :class:`RecycleOutput` ``(out, lengths)``; layout in the module docstring.

    Autograd: through the torch path (``"auto"`` routes inputs that require grad there);
    ``backend="triton"`` refuses them.
    """
    choice = requested_backend(backend)
    args = (x, keep_index, merge_index, merge_slot, merge_weight)
    kwargs = dict(into=into, num_slots=num_slots, keep_weight=keep_weight, lengths=lengths, pad_value=pad_value)
    if choice == "torch":
        return recycle_torch(*args, **kwargs)
    slots = check_recycle_args(*args, into, num_slots, keep_weight, lengths)
    rows = keep_index.shape[1] + (slots if into == "new" else 0)
    numel = keep_index.shape[0] * rows * math.prod(x.shape[2:])
    if choice == "auto" and not use_triton(numel, _triton_recycle_reason(*args, keep_weight, lengths), op="recycle"):
        return recycle_torch(*args, **kwargs)
    from vtprune.kernels.triton_compact import triton_recycle

    return triton_recycle(*args, **kwargs)
