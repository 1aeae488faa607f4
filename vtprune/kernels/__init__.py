"""Compaction kernels: gather kept tokens, optionally merging pruned ones, on torch or Triton.

Public API (shapes in each docstring):

- :func:`compact` / :func:`compact_torch`: ``[B, N, ...]`` + keep ids ``[B, N']`` -> ``[B, N', ...]``.
- :func:`recycle` / :func:`recycle_torch`: compaction plus weighted-mean merging of pruned tokens
  into R new tokens or into kept tokens, returning :class:`RecycleOutput` ``(out, lengths)``.
- :func:`lengths_to_mask`: ``[B]`` lengths -> ``[B, size]`` prefix mask of a ragged output.

Dispatch: ``backend=None`` reads ``$VTPRUNE_KERNEL_BACKEND`` ("auto" when unset); "auto" runs the
Triton kernels for CUDA tensors when triton imports, the inputs fit them and the output is large
enough (:func:`use_triton`: at least :func:`triton_min_elements` elements, ``$VTPRUNE_TRITON_MIN_ELEMENTS``
overrides), torch otherwise. Importing this package never imports triton.

Modules: ``_common`` (checks, dispatch decision, shared helpers), ``compact`` / ``recycle`` (torch
references and dispatchers), ``triton_compact`` (kernels and launchers; imports only ``_common``).
"""

from vtprune.kernels._common import (
    ENV_BACKEND,
    ENV_TRITON_MIN_ELEMENTS,
    KernelUnsupportedError,
    lengths_to_mask,
    triton_available,
    triton_min_elements,
    use_triton,
)
from vtprune.kernels.compact import compact, compact_torch
from vtprune.kernels.recycle import RecycleOutput, recycle, recycle_torch

__all__ = [
    "ENV_BACKEND",
    "ENV_TRITON_MIN_ELEMENTS",
    "KernelUnsupportedError",
    "RecycleOutput",
    "compact",
    "compact_torch",
    "lengths_to_mask",
    "recycle",
    "recycle_torch",
    "triton_available",
    "triton_min_elements",
    "use_triton",
]
