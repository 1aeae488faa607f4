"""Token compaction: gather the kept tokens of every sample into a shorter sequence.

This is the one compaction function every pruning point goes through (pre-LLM shortening and
in-LLM dropping), for hidden states ``[B, N, D]``, RoPE cos/sin ``[B|1, N, d]`` and position ids
``[B, N]``. :func:`compact_torch` is the CPU path and the reference the Triton kernel
(:mod:`vtprune.kernels.triton_compact`) is tested against bit for bit; :func:`compact` dispatches.

Ragged batches: when samples keep different numbers of tokens, pass ``lengths`` (``[B]``). Row ``b``
of the output holds its ``lengths[b]`` kept tokens first (``index[b, :lengths[b]]``, in that order)
and ``pad_value`` in rows ``lengths[b]:``; the entries of ``index`` past ``lengths[b]`` are ignored
(they may hold anything). The matching mask is ``lengths_to_mask(lengths, N')``.
"""

from __future__ import annotations

import math

import torch

from vtprune.kernels._common import (
    TRITON_COMPACT_DTYPES,
    as_3d,
    check_compact_args,
    lengths_to_mask,
    needs_grad,
    requested_backend,
    triton_available,
    use_triton,
)


def compact_torch(
    x: torch.Tensor,
    index: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    pad_value: float | int = 0,
) -> torch.Tensor:
    """Reference gather along the token axis (torch indexing; differentiable).

    Args:
        x: ``[B, N, ...]`` (or ``[1, N, ...]``, broadcast over the batch of ``index``).
        index: ``[B, N']`` int64/int32 token indices in ``[0, N)``, one row per sample.
        lengths: optional ``[B]`` int; only the first ``lengths[b]`` entries of ``index[b]`` are used.
        pad_value: fill of the rows past ``lengths[b]``.

    Returns:
        ``[B, N', ...]`` with ``out[b, i] = x[b, index[b, i]]`` (bit-exact copies of input rows) for
        ``i < lengths[b]`` and ``pad_value`` elsewhere.
    """
    check_compact_args(x, index, lengths)
    B, K = index.shape
    idx = index.long()
    if lengths is not None:
        valid = lengths_to_mask(lengths, K)
        idx = torch.where(valid, idx, 0)
    trailing = x.shape[2:]
    # index_select on the flattened rows is several times faster than advanced indexing on the CPU
    if x.shape[0] == 1:
        out = x[0].index_select(0, idx.reshape(-1))
    else:
        rows = idx + torch.arange(B, device=idx.device).unsqueeze(1) * x.shape[1]
        out = x.reshape(B * x.shape[1], *trailing).index_select(0, rows.reshape(-1))
    out = out.view(B, K, *trailing)
    if lengths is None:
        return out
    return out.masked_fill(~valid.view(B, K, *([1] * len(trailing))), pad_value)


def _triton_compact_reason(x: torch.Tensor, index: torch.Tensor, lengths: torch.Tensor | None) -> str | None:
    """Why the Triton kernel cannot take these inputs, or None when it can."""
    if not triton_available():
        return "triton cannot be imported"
    if not (x.is_cuda and index.is_cuda):
        return f"the Triton kernel runs on CUDA tensors, got x on {x.device}"
    if x.dtype not in TRITON_COMPACT_DTYPES:
        return f"dtype {x.dtype} is not supported by the Triton kernel"
    if needs_grad(x):
        return "x requires grad; the Triton kernel has no backward (use the torch backend for autograd)"
    if as_3d(x) is None:
        return f"x of shape {tuple(x.shape)} and strides {x.stride()} has non-contiguous trailing dims"
    return None


def compact(
    x: torch.Tensor,
    index: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    pad_value: float | int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """Gather the kept tokens: ``[B, N, ...]`` + ``[B, N']`` -> ``[B, N', ...]``.

    Used for hidden states ``[B, N, D]``, RoPE cos/sin ``[B|1, N, d]`` (a batch of 1 broadcasts over
    the batch of ``index``) and position ids ``[B, N]``. Results are bit-exact copies of input rows
    whichever backend runs. See :func:`compact_torch` for the arguments and the ragged layout.

    Args:
        backend: ``"auto"`` (Triton for CUDA tensors when triton imports, the layout allows it and the
            output has at least ``triton_min_elements("compact")`` elements (default 1 << 20, env
            ``$VTPRUNE_TRITON_MIN_ELEMENTS``); else torch), ``"torch"`` or ``"triton"`` (raises
            ``KernelUnsupportedError`` when the inputs don't fit the kernel). None reads
            ``$VTPRUNE_KERNEL_BACKEND`` (default "auto").

    Autograd: supported through the torch path. ``"auto"`` sends inputs that require grad to torch;
    ``"triton"`` refuses them.
    """
    choice = requested_backend(backend)
    if choice == "torch":
        return compact_torch(x, index, lengths=lengths, pad_value=pad_value)
    check_compact_args(x, index, lengths)
    numel = index.numel() * math.prod(x.shape[2:])  # of the output [B, N', ...]
    if choice == "auto" and not use_triton(numel, _triton_compact_reason(x, index, lengths)):
        return compact_torch(x, index, lengths=lengths, pad_value=pad_value)
    from vtprune.kernels.triton_compact import triton_compact

    return triton_compact(x, index, lengths=lengths, pad_value=pad_value)
