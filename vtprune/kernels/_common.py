"""Argument checks, backend choice and small helpers shared by the torch and Triton paths.

Nothing here imports triton, so the checks (and their error messages) behave the same on machines
without it.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_BACKEND = "VTPRUNE_KERNEL_BACKEND"

# dtypes the Triton gather copies verbatim; the recycle kernel accumulates in float32 and
# therefore takes floating inputs only.
TRITON_COMPACT_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
)
TRITON_RECYCLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_INDEX_DTYPES = (torch.int64, torch.int32)


class KernelUnsupportedError(ValueError):
    """The Triton backend cannot take these inputs (layout, dtype, device, grad).

    Raised only when the Triton backend was forced; ``backend="auto"`` falls back to torch instead.
    """


_triton_ok: bool | None = None


def triton_available() -> bool:
    """True when ``import triton`` succeeds (checked once, lazily)."""
    global _triton_ok
    if _triton_ok is None:
        if importlib.util.find_spec("triton") is None:
            _triton_ok = False
        else:
            try:
                import triton  # noqa: F401

                _triton_ok = True
            except Exception:  # a broken install counts as missing
                _triton_ok = False
    return _triton_ok


def requested_backend(backend: str | None) -> str:
    """The backend asked for: the argument when given, else ``$VTPRUNE_KERNEL_BACKEND``, else "auto"."""
    source = "backend argument"
    if backend is None:
        backend = os.environ.get(ENV_BACKEND, "auto").strip().lower() or "auto"
        source = f"environment variable {ENV_BACKEND}"
    if backend not in BACKENDS:
        raise ValueError(f"vtprune.kernels: {source} must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and not triton_available():
        raise RuntimeError(
            f"vtprune.kernels: the Triton backend was requested ({source}) but triton cannot be "
            "imported; install it (pip install 'vtprune[triton]') or use backend='torch'"
        )
    return backend


ENV_TRITON_MIN_ELEMENTS = "VTPRUNE_TRITON_MIN_ELEMENTS"

# Smallest output (elements) for which backend="auto" launches Triton; smaller outputs run on torch,
# where one index_select beats a kernel launch plus its argument checks. PROVISIONAL, not yet measured
# as a crossover on a GPU. The H100 table in docs/kernels.md has compact at 0.95-1.04x for B=1
# outputs of 0.26-0.79M elements and 1.9x at 2.1M (B=8, K=64), so 1 << 20 sits between them.
# recycle has a lower default: torch's reference is a dozen launches (gather, scatter_add, cat),
# and Triton beat it 3.5x even at the smallest measured output (B=1, K=64 + R=16, D=4096: 0.33M).
TRITON_MIN_ELEMENTS = {"compact": 1 << 20, "recycle": 1 << 16}


def triton_min_elements(op: str = "compact") -> int:
    """The threshold of ``op`` (``"compact"`` or ``"recycle"``): ``$VTPRUNE_TRITON_MIN_ELEMENTS`` when set
    (one value for both ops; 0 sends every fitting CUDA input to Triton), else `TRITON_MIN_ELEMENTS`."""
    if op not in TRITON_MIN_ELEMENTS:
        raise ValueError(f"vtprune.kernels: no Triton threshold for op {op!r}; ops: {sorted(TRITON_MIN_ELEMENTS)}")
    text = os.environ.get(ENV_TRITON_MIN_ELEMENTS, "").strip()
    if not text:
        return TRITON_MIN_ELEMENTS[op]
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(
            f"vtprune.kernels: environment variable {ENV_TRITON_MIN_ELEMENTS} must be a non-negative integer "
            f"(output elements, e.g. 1048576), got {text!r}"
        )
    return value


def use_triton(numel: int, unsupported: str | None = None, *, op: str = "compact",
               min_elements: int | None = None) -> bool:
    """Whether ``backend="auto"`` runs the Triton kernel for an output of ``numel`` elements.

    False when the kernel cannot take the inputs (``unsupported``: the reason, e.g. CPU tensors or
    triton missing) or the output is smaller than ``min_elements`` (default `triton_min_elements`
    of ``op``); True otherwise. A pure decision: forced backends never consult it.
    """
    if unsupported is not None:
        return False
    threshold = triton_min_elements(op) if min_elements is None else min_elements
    return numel >= threshold


def _check_index(name: str, op: str, t: torch.Tensor, batch: int, x: torch.Tensor, width: int | None = None):
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be [batch, n], got shape {tuple(t.shape)}")
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be an integer tensor (int64/int32), got {t.dtype}")
    if t.shape[0] != batch:
        raise ValueError(f"{op}: {name} has batch {t.shape[0]}, expected {batch}")
    if width is not None and t.shape[1] != width:
        raise ValueError(f"{op}: {name} must have {width} columns, got shape {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{op}: x is on {x.device} but {name} is on {t.device}; move them to one device")


def check_x_batch(op: str, x: torch.Tensor, batch: int) -> None:
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be [batch, tokens, ...], got shape {tuple(x.shape)}")
    if x.shape[0] not in (1, batch):
        raise ValueError(f"{op}: batch of x ({x.shape[0]}) must be 1 or match the batch of index ({batch})")


def check_lengths(op: str, lengths: torch.Tensor | None, batch: int, x: torch.Tensor) -> None:
    if lengths is None:
        return
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{op}: lengths must be a [batch] integer tensor, got {type(lengths).__name__}")
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"{op}: lengths must be [batch] = [{batch}], got shape {tuple(lengths.shape)}")
    if lengths.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{op}: lengths must be an integer tensor (int64/int32), got {lengths.dtype}")
    if lengths.device != x.device:
        raise ValueError(f"{op}: x is on {x.device} but lengths is on {lengths.device}; move them to one device")


def check_compact_args(x: torch.Tensor, index: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
    op = "compact"
    if index.dim() != 2:
        raise ValueError(f"{op}: index must be [batch, kept], got shape {tuple(index.shape)}")
    check_x_batch(op, x, index.shape[0])
    _check_index("index", op, index, index.shape[0], x)
    check_lengths(op, lengths, index.shape[0], x)


def check_recycle_args(
    x: torch.Tensor,
    keep_index: torch.Tensor,
    merge_index: torch.Tensor,
    merge_slot: torch.Tensor,
    merge_weight: torch.Tensor,
    into: str,
    num_slots: int | None,
    keep_weight: torch.Tensor | None,
    lengths: torch.Tensor | None,
) -> int:
    """Validate :func:`recycle` arguments; returns the number of slots S (R, or K for ``into="kept"``)."""
    op = "recycle"
    if keep_index.dim() != 2:
        raise ValueError(f"{op}: keep_index must be [batch, kept], got shape {tuple(keep_index.shape)}")
    batch, kept = keep_index.shape
    check_x_batch(op, x, batch)
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating tensor (weighted means), got {x.dtype}")
    _check_index("keep_index", op, keep_index, batch, x)
    _check_index("merge_index", op, merge_index, batch, x)
    _check_index("merge_slot", op, merge_slot, batch, x, width=merge_index.shape[1])
    if merge_weight.shape != merge_index.shape:
        raise ValueError(
            f"{op}: merge_weight must be [batch, merged] = {tuple(merge_index.shape)}, "
            f"got shape {tuple(merge_weight.shape)}"
        )
    if not merge_weight.is_floating_point():
        raise TypeError(f"{op}: merge_weight must be a floating tensor, got {merge_weight.dtype}")
    if merge_weight.device != x.device:
        raise ValueError(f"{op}: x is on {x.device} but merge_weight is on {merge_weight.device}")
    check_lengths(op, lengths, batch, x)
    if into == "new":
        if num_slots is None or int(num_slots) < 0:
            raise ValueError(f"{op}: into='new' needs num_slots=R >= 0 (the number of recycled tokens)")
        if keep_weight is not None:
            raise ValueError(f"{op}: keep_weight only applies to into='kept'")
        return int(num_slots)
    if into == "kept":
        if num_slots is not None and int(num_slots) != kept:
            raise ValueError(
                f"{op}: into='kept' merges into the {kept} kept tokens; num_slots must be None or {kept}"
            )
        if keep_weight is not None:
            if keep_weight.shape != keep_index.shape:
                raise ValueError(
                    f"{op}: keep_weight must be [batch, kept] = {tuple(keep_index.shape)}, "
                    f"got shape {tuple(keep_weight.shape)}"
                )
            if not keep_weight.is_floating_point():
                raise TypeError(f"{op}: keep_weight must be a floating tensor, got {keep_weight.dtype}")
            if keep_weight.device != x.device:
                raise ValueError(f"{op}: x is on {x.device} but keep_weight is on {keep_weight.device}")
        return kept
    raise ValueError(f"{op}: into must be 'new' or 'kept', got {into!r}")


def lengths_to_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """Validity mask of a ragged output: ``[B]`` lengths -> ``[B, size]`` bool, True on real rows.

    Every ragged output of this package is laid out left-aligned (real rows first, padding at the
    end), so the mask is the prefix ``arange(size) < lengths[:, None]``.
    """
    return torch.arange(size, device=lengths.device) < lengths.to(torch.long).unsqueeze(1)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def as_3d(x: torch.Tensor) -> torch.Tensor | None:
    """View ``[B, N, ...]`` as ``[B, N, D]`` without copying, or None when the trailing dims don't allow it."""
    d = 1
    for s in x.shape[2:]:
        d *= s
    try:
        v = x.view(x.shape[0], x.shape[1], d)
    except RuntimeError:
        return None
    if d > 1 and v.stride(2) != 1:
        return None
    return v


class RecycleOutput(NamedTuple):
    """Result of :func:`recycle`.

    Attributes:
        out: ``[B, K + R, ...]`` (``into="new"``) or ``[B, K, ...]`` (``into="kept"``), ``x.dtype``.
        lengths: ``[B]`` int64, number of valid (prefix) rows of ``out`` per sample.
    """

    out: torch.Tensor
    lengths: torch.Tensor


def slot_validity(merge_slot: torch.Tensor, num_slots: int, into: str, lengths: torch.Tensor | None):
    """``(slot, valid)``: ``merge_slot`` as int64 and whether each entry targets a real slot (see `recycle`)."""
    slot = merge_slot.long()
    valid = (slot >= 0) & (slot < num_slots)
    if into == "kept" and lengths is not None:
        valid &= slot < lengths.long().unsqueeze(1)
    return slot, valid


def build_slot_csr(
    merge_index: torch.Tensor,
    merge_slot: torch.Tensor,
    merge_weight: torch.Tensor,
    num_slots: int,
    into: str,
    lengths: torch.Tensor | None,
):
    """Group merged tokens by slot (compressed rows), on the tensors' device, without a host sync.

    Returns ``members [B, M]`` int64 token ids and ``weights [B, M]`` float32 sorted by slot (stable),
    and ``offsets [B, S + 1]`` int32: slot ``s`` of sample ``b`` owns ``members[b, offsets[b, s]:
    offsets[b, s + 1]]``. Ignored entries sort past ``offsets[b, S]``.
    """
    B, M = merge_index.shape
    slot, valid = slot_validity(merge_slot, num_slots, into, lengths)
    if M == 0:
        zeros = torch.zeros(B, num_slots + 1, dtype=torch.int32, device=merge_index.device)
        return merge_index.long(), merge_weight.float(), zeros
    key = torch.where(valid, slot, num_slots)
    sorted_key, order = torch.sort(key, dim=1, stable=True)
    members = merge_index.long().gather(1, order)
    weights = merge_weight.float().gather(1, order)
    bounds = torch.arange(num_slots + 1, device=key.device).expand(B, -1).contiguous()
    offsets = torch.searchsorted(sorted_key.contiguous(), bounds, out_int32=True)
    return members, weights, offsets
