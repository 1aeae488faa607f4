"""Token compaction: gather the kept tokens of every sample into a shorter sequence.

This is the one compaction function every pruning point goes through (pre-LLM shortening and
in-LLM dropping). The torch implementation here is the CPU path and the reference that the Triton
kernel (``vtprune.kernels``) is tested against.
"""

from __future__ import annotations

import torch


def _check_compact_args(x: torch.Tensor, index: torch.Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"compact: x must be [batch, tokens, ...], got shape {tuple(x.shape)}")
    if index.dim() != 2:
        raise ValueError(f"compact: index must be [batch, kept], got shape {tuple(index.shape)}")
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"compact: index must be an integer tensor (int64/int32), got {index.dtype}")
    if x.shape[0] not in (1, index.shape[0]):
        raise ValueError(
            f"compact: batch of x ({x.shape[0]}) must be 1 or match the batch of index ({index.shape[0]})"
        )
    if index.device != x.device:
        raise ValueError(f"compact: x is on {x.device} but index is on {index.device}; move them to one device")


def compact_torch(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Reference gather along the token axis.

    Args:
        x: ``[B, N, ...]`` (or ``[1, N, ...]``, broadcast over the batch of ``index``).
        index: ``[B, N']`` token indices in ``[0, N)``, one row per sample.

    Returns:
        ``[B, N', ...]`` with ``out[b, i] = x[b, index[b, i]]``; bit-exact copies of the input rows.
    """
    _check_compact_args(x, index)
    if x.shape[0] == 1 and index.shape[0] > 1:
        x = x.expand(index.shape[0], *x.shape[1:])
    batch = torch.arange(index.shape[0], device=index.device).unsqueeze(1)
    return x[batch, index.long()]


def compact(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather the kept tokens: ``[B, N, ...]`` + ``[B, N']`` -> ``[B, N', ...]``.

    Used for hidden states ``[B, N, D]``, RoPE cos/sin ``[B|1, N, d]`` and position ids.
    """
    return compact_torch(x, index)
