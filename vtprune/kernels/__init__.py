"""Compaction kernels: gather kept tokens (and, later, merge pruned ones). Torch on CPU."""

from vtprune.kernels.compact import compact, compact_torch

__all__ = ["compact", "compact_torch"]
