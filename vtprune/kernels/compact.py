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

import torch

from vtprune.kernels._common import (
    TRITON_COMPACT_DTYPES,
    as_3d,
    check_compact_args,
    lengths_to_mask,
    needs_grad,
    requested_backend,
    triton_available,
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
    if x.shape[0] == 1 and index.shape[0] > 1:
        x = x.expand(index.shape[0], *x.shape[1:])
    batch = torch.arange(index.shape[0], device=index.device).unsqueeze(1)
    if lengths is None:
        return x[batch, index.long()]
    valid = lengths_to_mask(lengths, index.shape[1])
    out = x[batch, torch.where(valid, index.long(), 0)]
    return out.masked_fill(~valid.view(*valid.shape, *([1] * (x.dim() - 2))), pad_value)


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
        backend: ``"auto"`` (Triton for CUDA tensors when triton imports and the layout allows it,
            else torch), ``"torch"`` or ``"triton"`` (raises ``KernelUnsupportedError`` when the
            inputs don't fit the kernel). None reads ``$VTPRUNE_KERNEL_BACKEND`` (default "auto").

    Autograd: supported through the torch path. ``"auto"`` sends inputs that require grad to torch;
    ``"triton"`` refuses them.
    """
    choice = requested_backend(backend)
    if choice == "torch":
        return compact_torch(x, index, lengths=lengths, pad_value=pad_value)
    check_compact_args(x, index, lengths)
    if choice == "auto" and _triton_compact_reason(x, index, lengths) is not None:
        return compact_torch(x, index, lengths=lengths, pad_value=pad_value)
    from vtprune.kernels.triton_compact import triton_compact

    return triton_compact(x, index, lengths=lengths, pad_value=pad_value)
