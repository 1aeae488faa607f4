"""Compaction kernels: gather kept tokens, optionally merging pruned ones, on torch or Triton.

Public API (shapes in each docstring):

- :func:`compact` / :func:`compact_torch`: ``[B, N, ...]`` + keep ids ``[B, N']`` -> ``[B, N', ...]``.
- :func:`recycle` / :func:`recycle_torch`: compaction plus weighted-mean merging of pruned tokens
  into R new tokens or into kept tokens, returning :class:`RecycleOutput` ``(out, lengths)``.
- :func:`lengths_to_mask`: ``[B]`` lengths -> ``[B, size]`` prefix mask of a ragged output.

Dispatch: ``backend=None`` reads ``$VTPRUNE_KERNEL_BACKEND`` ("auto" when unset); "auto" runs the
Triton kernels for CUDA tensors when triton imports (and the inputs fit them), torch otherwise.
Importing this package never imports triton.
"""

from vtprune.kernels._common import (
    ENV_BACKEND,
    KernelUnsupportedError,
    lengths_to_mask,
    triton_available,
)
from vtprune.kernels.compact import compact, compact_torch
from vtprune.kernels.recycle import RecycleOutput, recycle, recycle_torch

__all__ = [
    "ENV_BACKEND",
    "KernelUnsupportedError",
    "RecycleOutput",
    "compact",
    "compact_torch",
    "lengths_to_mask",
    "recycle",
    "recycle_torch",
    "triton_available",
]
