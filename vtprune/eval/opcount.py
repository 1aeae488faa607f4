"""Count dispatched aten ops and would-be host syncs during a block, attributed to vtprune or to the model.

    from vtprune.eval.opcount import OpCounter, count_prefill_decode

    with OpCounter() as counter:
        model(**inputs)
    res = counter.result()
    print(res.vtprune_ops, res.vtprune_syncs)
    print(res.format_sites())  # where each vtprune sync came from

    pd = count_prefill_decode(model, inputs, decode_steps=2)  # generate(): prefill, then decode steps
    pd.prefill.vtprune_syncs, pd.decode_mean("vtprune_ops")

Everything runs on the CPU, where nothing syncs; what is counted is what WOULD sync on a GPU:

- **ops**: every aten op that reaches a `TorchDispatchMode` (after autograd and composite decompositions).
- **syncs** (dispatched): ``aten::_local_scalar_dense`` (``.item()``, ``bool(t)``, ``int(t)``,
  ``float(t)``, a tensor used as a Python index), ``nonzero``, ``is_nonzero``, ``item``, ``unique*``,
  ``masked_select``, ``bincount`` (its CUDA kernel reads min/max on the host), ``equal``, indexing with a
  bool/uint8 mask (``aten::index.Tensor`` / ``index_put_`` with a bool index) and ``repeat_interleave``
  with a tensor of repeats and no ``output_size``. Dispatched syncs are also ops.
- **syncs** (wrapped methods; on a CPU tensor they dispatch nothing): ``Tensor.tolist``, ``Tensor.cpu``,
  ``Tensor.numpy`` (and ``np.asarray(t)`` through ``__array__``), and ``Tensor.to`` with a CPU target
  spelled as a string (``"cpu"``). ``.to(t.device)`` / ``.to(torch.device("cpu"))`` are counted only with
  ``strict_to=True``: on a CPU run ``t.device`` is the CPU even where it would be the GPU, so by default
  such moves are not counted. These are not counted as ops.

Attribution: the innermost Python frame outside torch's own package, this module, ``functools`` and
``contextlib`` decides. A file under the vtprune package directory makes the op vtprune's (also an
``nn.Linear`` called from vtprune code: ``torch/nn`` frames are skipped); anything else (transformers'
layers, generate, a test) is the model's, even when a vtprune hook or wrapper frame is further up.
Frames are walked with ``sys._getframe`` and each code file is classified once, so counting costs a few
microseconds per op.

This module imports only torch and the standard library.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import weakref
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

__all__ = [
    "DeviceTensors",
    "OpCounter",
    "OpCounts",
    "PrefillDecodeCounts",
    "count_ops",
    "count_prefill_decode",
]

# ------------------------------------------------------------------------------------------------
# attribution
# ------------------------------------------------------------------------------------------------

_SKIP, _VTPRUNE, _MODEL = 0, 1, 2


def _dir_of(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


_THIS_FILE = _dir_of(__file__)
_VTPRUNE_DIR = os.path.dirname(os.path.dirname(_THIS_FILE)) + os.sep  # .../vtprune/
_ROOT_DIR = os.path.dirname(_VTPRUNE_DIR.rstrip(os.sep)) + os.sep  # the directory holding vtprune/
_TORCH_DIR = os.path.dirname(_dir_of(torch.__file__)) + os.sep
_SKIP_FILES = {_THIS_FILE, _dir_of(functools.__file__), _dir_of(contextlib.__file__)}
_FILE_KIND: dict[str, int] = {}  # co_filename -> _SKIP / _VTPRUNE / _MODEL


def _classify(filename: str) -> int:
    path = _dir_of(filename) if not filename.startswith("<") else filename
    if path in _SKIP_FILES or path.startswith(_TORCH_DIR):
        return _SKIP
    if path.startswith(_VTPRUNE_DIR):
        return _VTPRUNE
    return _MODEL


def _attribute(frame) -> tuple[int, Any]:
    """``(owner, frame)``: the innermost frame outside torch / this module / functools / contextlib."""
    kinds = _FILE_KIND
    while frame is not None:
        filename = frame.f_code.co_filename
        kind = kinds.get(filename)
        if kind is None:
            kind = kinds[filename] = _classify(filename)
        if kind != _SKIP:
            return kind, frame
        frame = frame.f_back
    return _MODEL, None


def _where(frame) -> str:
    """``file:line`` of a frame, relative to the checkout for vtprune files, after site-packages otherwise."""
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    full = _dir_of(path) if not path.startswith("<") else path
    marker = os.sep + "site-packages" + os.sep
    if marker in full:
        path = full.split(marker, 1)[1]
    elif full.startswith(_ROOT_DIR):
        path = full[len(_ROOT_DIR):]
    return f"{path}:{frame.f_lineno}"


# ------------------------------------------------------------------------------------------------
# which ops sync
# ------------------------------------------------------------------------------------------------

_NO, _ALWAYS, _INDEX, _INDEX_PUT, _REPEAT = 0, 1, 2, 3, 4
_ALWAYS_SYNC = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "bincount", "equal"}
_SYNC_KIND: dict[Any, int] = {}  # OpOverload -> kind


def _sync_kind(func) -> int:
    kind = _SYNC_KIND.get(func)
    if kind is None:
        name = func.overloadpacket.__name__
        if name in _ALWAYS_SYNC or name.startswith(("unique", "_unique")):
            kind = _ALWAYS
        elif name == "index":
            kind = _INDEX
        elif name in ("index_put", "index_put_", "_index_put_impl", "_index_put_impl_"):
            kind = _INDEX_PUT
        elif name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor"):
            kind = _REPEAT
        else:
            kind = _NO
        _SYNC_KIND[func] = kind
    return kind


def _has_mask(indices) -> bool:
    if not isinstance(indices, (list, tuple)):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _sync_name(func, args, kwargs) -> str | None:
    """The name a sync is recorded under, or None when ``func(*args, **kwargs)`` would not sync."""
    kind = _sync_kind(func)
    if kind == _NO:
        return None
    if kind == _ALWAYS:
        return func.name()
    if kind in (_INDEX, _INDEX_PUT):
        indices = args[1] if len(args) > 1 else kwargs.get("indices")
        return f"{func.name()} (bool mask)" if _has_mask(indices) else None
    # repeat_interleave with a tensor of repeats: the output length is read on the host unless given
    return func.name() if kwargs.get("output_size") is None else None


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OpCounts:
    """What an `OpCounter` saw. ``sync_sites`` / ``model_sync_sites``: ``(op, "file:line") -> n``."""

    total_ops: int = 0
    vtprune_ops: int = 0
    vtprune_syncs: int = 0
    model_syncs: int = 0
    sync_sites: Counter = dataclasses.field(default_factory=Counter)  # vtprune's syncs
    model_sync_sites: Counter = dataclasses.field(default_factory=Counter)
    vtprune_op_names: Counter = dataclasses.field(default_factory=Counter)  # aten name -> n (vtprune's ops)

    @property
    def model_ops(self) -> int:
        return self.total_ops - self.vtprune_ops

    @property
    def total_syncs(self) -> int:
        return self.vtprune_syncs + self.model_syncs

    def __add__(self, other: OpCounts) -> OpCounts:
        return OpCounts(
            self.total_ops + other.total_ops,
            self.vtprune_ops + other.vtprune_ops,
            self.vtprune_syncs + other.vtprune_syncs,
            self.model_syncs + other.model_syncs,
            self.sync_sites + other.sync_sites,
            self.model_sync_sites + other.model_sync_sites,
            self.vtprune_op_names + other.vtprune_op_names,
        )

    def copy(self) -> OpCounts:
        return OpCounts(self.total_ops, self.vtprune_ops, self.vtprune_syncs, self.model_syncs,
                        Counter(self.sync_sites), Counter(self.model_sync_sites), Counter(self.vtprune_op_names))

    def format_sites(self, owner: str = "vtprune", limit: int | None = None) -> str:
        """One line per sync site, most frequent first: ``  3x aten::nonzero  vtprune/layout.py:201``."""
        sites = self.sync_sites if owner == "vtprune" else self.model_sync_sites
        lines = [f"{n:4d}x {op}  {where}" for (op, where), n in sites.most_common(limit)]
        return "\n".join(lines) if lines else "(no syncs)"

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers (and the sites as ``"op @ file:line" -> n``), for JSON."""
        return {
            "total_ops": self.total_ops, "vtprune_ops": self.vtprune_ops, "model_ops": self.model_ops,
            "vtprune_syncs": self.vtprune_syncs, "model_syncs": self.model_syncs,
            "sync_sites": {f"{op} @ {w}": n for (op, w), n in self.sync_sites.most_common()},
            "model_sync_sites": {f"{op} @ {w}": n for (op, w), n in self.model_sync_sites.most_common()},
        }


# ------------------------------------------------------------------------------------------------
# the counter
# ------------------------------------------------------------------------------------------------

_ACTIVE: list[OpCounter] = []  # entered counters, innermost last
_WRAPPED: dict[str, Any] = {}  # Tensor method name -> what torch.Tensor.__dict__ held (None: inherited)
_IN_WRAPPER = [0]  # depth of wrapped Tensor-method calls (their own dispatched ops are not syncs again)


class DeviceTensors:
    """Which tensors would live on the accelerator, tracked by identity (weak references).

    Roots are the model's parameters and buffers and the inputs; every output of an op that read a device
    tensor is a device tensor; ``Tensor.to(...)`` called from vtprune code moves to the device (an
    explicit host-to-device copy); ``Tensor.cpu()`` (and ``.to("cpu")``) returns a host tensor. Factory
    ops (``torch.arange(n)``) without a tensor input make host tensors, also where vtprune passes
    ``device=`` (a counting gap: such a tensor is only counted once it meets a device tensor).
    """

    def __init__(self) -> None:
        self._refs: dict[int, Any] = {}

    def add(self, t: torch.Tensor) -> None:
        self._refs[id(t)] = weakref.ref(t)

    def __contains__(self, t: object) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t

    def add_roots(self, *objs: Any) -> None:
        """Mark tensors found in ``objs`` (modules: their parameters and buffers; dicts, lists, tensors)."""
        for obj in objs:
            if isinstance(obj, torch.nn.Module):
                for t in (*obj.parameters(), *obj.buffers()):
                    self.add(t)
            elif isinstance(obj, torch.Tensor):
                self.add(obj)
            elif isinstance(obj, dict):
                self.add_roots(*obj.values())
            elif isinstance(obj, (list, tuple)):
                self.add_roots(*obj)

    def any_in(self, values: Any) -> bool:
        flat, _ = tree_flatten(values)
        return any(isinstance(t, torch.Tensor) and t in self for t in flat)

    def mark(self, values: Any) -> None:
        flat, _ = tree_flatten(values)
        for t in flat:
            if isinstance(t, torch.Tensor):
                self.add(t)


def _to_target_is_host(args, kwargs, strict: bool) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` names a CPU device (strings only unless ``strict``)."""
    target = kwargs.get("device")
    if target is None:
        for a in args:
            if isinstance(a, (str, torch.device)) or (strict and isinstance(a, torch.Tensor)):
                target = a
                break
    if isinstance(target, str):
        return target.split(":")[0] == "cpu"
    if not strict:
        return False
    if isinstance(target, torch.Tensor):
        target = target.device
    return isinstance(target, torch.device) and target.type == "cpu"


def _record_host(name: str, frame, tensor: torch.Tensor, to_args=None) -> None:
    for c in _ACTIVE:
        if c._paused:
            continue
        if c.devices is not None and tensor not in c.devices:
            continue  # a host tensor: reading it costs nothing
        if to_args is not None and not _to_target_is_host(*to_args, strict=c.strict_to):
            continue
        c._record_sync(name, frame)


def _wrap(method: str):
    original = getattr(torch.Tensor, method)
    label = f"Tensor.{method}" if method != "to" else "Tensor.to(cpu)"

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        top = _ACTIVE and not _IN_WRAPPER[0]
        frame = sys._getframe(1)
        if top:
            _record_host(label, frame, self, (args, kwargs) if method == "to" else None)
        _IN_WRAPPER[0] += 1
        try:
            out = original(self, *args, **kwargs)
        finally:
            _IN_WRAPPER[0] -= 1
        if top and isinstance(out, torch.Tensor):
            if out is self and method in ("cpu", "to") and self in _tracked() and _attribute(frame)[0] == _VTPRUNE \
                    and (method == "cpu" or _to_target_is_host(args, kwargs, strict=False)):
                # on a CPU run the "host copy" is the device tensor itself: give vtprune a real copy, so
                # its host-side work is not mistaken for device reads
                with _disable_current_modes():
                    out = self.clone()
            _track_move(method, self, out, frame, args, kwargs)
        return out

    return wrapper


class _Union:
    def __init__(self, sets):
        self.sets = sets

    def __contains__(self, t) -> bool:
        return any(t in d for d in self.sets)


def _tracked() -> _Union:
    return _Union([c.devices for c in _ACTIVE if c.devices is not None])


def _track_move(method: str, src: torch.Tensor, out: torch.Tensor, frame, args, kwargs) -> None:
    """Device provenance through ``cpu()`` / ``to()`` for the counters that track it (`DeviceTensors`)."""
    for c in _ACTIVE:
        if c.devices is None:
            continue
        to_host = method == "cpu" or (method == "to" and _to_target_is_host(args, kwargs, strict=False))
        if to_host:
            continue  # the result is a host tensor (the same object on a CPU run: see OpCounter.cpu_copies)
        moves = method == "to" and any(isinstance(a, (str, torch.device, torch.Tensor)) for a in (*args, *kwargs.values()))
        if (moves and _attribute(frame)[0] == _VTPRUNE) or src in c.devices:
            c.devices.add(out)


def _install_wrappers() -> None:
    for method in ("tolist", "cpu", "numpy", "to"):
        _WRAPPED[method] = torch.Tensor.__dict__.get(method)
        setattr(torch.Tensor, method, _wrap(method))


def _remove_wrappers() -> None:
    for method, previous in _WRAPPED.items():
        if previous is None:
            delattr(torch.Tensor, method)
        else:
            setattr(torch.Tensor, method, previous)
    _WRAPPED.clear()


class _Mode(TorchDispatchMode):
    def __init__(self, counter: OpCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.counter
        if c.devices is None:
            if not c._paused:
                c._record_op(func, args, kwargs, sys._getframe(1))
            return func(*args, **kwargs)
        on_device = c.devices.any_in((args, kwargs))
        if not c._paused and on_device:
            c._record_op(func, args, kwargs, sys._getframe(1))
        out = func(*args, **kwargs)
        if on_device:
            c.devices.mark(out)
        return out


class OpCounter:
    """Context manager counting ops and would-be host syncs (module docstring), re-entrant across uses.

    ``counts`` is the live `OpCounts`; `result` a copy; `take` returns what was counted since the last
    `take` (or the start) and starts afresh: split a block into phases. `paused` stops counting inside
    its block (harness code). ``strict_to``: also count ``Tensor.to(<torch.device cpu>)`` and
    ``Tensor.to(<cpu tensor>)`` as syncs. ``op_names``: keep the per-name counts of vtprune's ops.
    """

    def __init__(self, *, strict_to: bool = False, op_names: bool = True, track: Any = None):
        self.strict_to = strict_to
        self.op_names = op_names
        # device provenance: with ``track`` (a model, its inputs, tensors) only ops reading a tensor that would
        # live on the accelerator count, and only reads of such tensors count as syncs
        self.devices: DeviceTensors | None = None
        if track is not None:
            self.devices = DeviceTensors()
            self.devices.add_roots(*(track if isinstance(track, tuple) else (track,)))
        self.counts = OpCounts()
        self._paused = False
        self._mode: _Mode | None = None

    # -- recording -------------------------------------------------------------------------------
    def _record_op(self, func, args, kwargs, frame) -> None:
        owner, frame = _attribute(frame)
        counts = self.counts
        counts.total_ops += 1
        if owner == _VTPRUNE:
            counts.vtprune_ops += 1
            if self.op_names:
                counts.vtprune_op_names[func.name()] += 1
        if _IN_WRAPPER[0]:
            return
        name = _sync_name(func, args, kwargs)
        if name is not None:
            self._add_sync(owner, name, frame)

    def _record_sync(self, name: str, frame) -> None:
        owner, frame = _attribute(frame)
        self._add_sync(owner, name, frame)

    def _add_sync(self, owner: int, name: str, frame) -> None:
        counts = self.counts
        if owner == _VTPRUNE:
            counts.vtprune_syncs += 1
            counts.sync_sites[(name, _where(frame))] += 1
        else:
            counts.model_syncs += 1
            counts.model_sync_sites[(name, _where(frame))] += 1

    # -- the context -----------------------------------------------------------------------------
    def __enter__(self) -> OpCounter:
        if self._mode is not None:
            raise RuntimeError("this OpCounter is already counting")
        if not _ACTIVE:
            _install_wrappers()
        _ACTIVE.append(self)
        self._mode = _Mode(self)
        try:
            self._mode.__enter__()
        except BaseException:
            self._leave()
            raise
        return self

    def __exit__(self, *exc) -> None:
        mode, self._mode = self._mode, None
        try:
            if mode is not None:
                mode.__exit__(*exc)
        finally:
            self._leave()

    def _leave(self) -> None:
        self._mode = None
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if not _ACTIVE:
            _remove_wrappers()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    # -- results ---------------------------------------------------------------------------------
    def result(self) -> OpCounts:
        return self.counts.copy()

    def take(self) -> OpCounts:
        out, self.counts = self.counts, OpCounts()
        return out

    def reset(self) -> None:
        self.counts = OpCounts()

    # shortcuts to the live counts
    @property
    def total_ops(self) -> int:
        return self.counts.total_ops

    @property
    def vtprune_ops(self) -> int:
        return self.counts.vtprune_ops

    @property
    def vtprune_syncs(self) -> int:
        return self.counts.vtprune_syncs

    @property
    def model_syncs(self) -> int:
        return self.counts.model_syncs


def count_ops(fn, *args, strict_to: bool = False, **kwargs) -> tuple[Any, OpCounts]:
    """``(fn(*args, **kwargs), counts)``."""
    with OpCounter(strict_to=strict_to) as counter:
        out = fn(*args, **kwargs)
    return out, counter.result()


# ------------------------------------------------------------------------------------------------
# prefill and decode steps of generate()
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PrefillDecodeCounts:
    """`count_prefill_decode`'s phases: ``prefill`` (generate's set-up and first forward) and one
    `OpCounts` per decode step (what ran after the previous forward, through this step's forward)."""

    prefill: OpCounts
    decode: list[OpCounts]
    sequences: torch.Tensor | None = None

    @property
    def decode_total(self) -> OpCounts:
        total = OpCounts()
        for step in self.decode:
            total = total + step
        return total

    def decode_mean(self, field: str) -> float:
        """Mean per decode step of an `OpCounts` field (``"vtprune_ops"``, ``"vtprune_syncs"``, ...)."""
        if not self.decode:
            return 0.0
        return sum(getattr(s, field) for s in self.decode) / len(self.decode)

    def as_dict(self) -> dict[str, Any]:
        fields = ("total_ops", "vtprune_ops", "model_ops", "vtprune_syncs", "model_syncs")
        out: dict[str, Any] = {f"prefill_{f}": getattr(self.prefill, f) for f in fields}
        out.update({f"decode_{f}_per_step": self.decode_mean(f) for f in fields})
        out["decode_steps"] = len(self.decode)
        out["prefill_sync_sites"] = self.prefill.as_dict()["sync_sites"]
        out["decode_sync_sites"] = self.decode_total.as_dict()["sync_sites"]
        return out


def count_prefill_decode(model, inputs: dict, *, decode_steps: int = 2, strict_to: bool = False,
                         track: bool = True, **generate_kwargs) -> PrefillDecodeCounts:
    """Count ``model.generate(**inputs)`` greedy for ``decode_steps + 1`` forced new tokens, split per forward.

    A forward hook on ``model`` (registered last, ``always_call``) closes each phase, so the prefill
    holds generate's set-up and the first forward, and decode step i what ran after forward i through
    forward i + 1 (generate's own bookkeeping, counted as the model's, included). What generate does
    after the last forward is not counted. ``generate_kwargs`` override the defaults
    (``do_sample=False``, ``max_new_tokens = min_new_tokens = decode_steps + 1``, the config's pad id).
    ``track``: count with device provenance (`DeviceTensors`: the model and ``inputs`` are on the
    accelerator), so host-side work on host copies is not counted as syncs; False counts every read.
    """
    n = decode_steps + 1
    kwargs: dict[str, Any] = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is None:
        config = getattr(model, "config", None)
        pad = getattr(getattr(config, "text_config", config), "pad_token_id", None)
    if pad is not None:
        kwargs["pad_token_id"] = pad
    kwargs.update(generate_kwargs)
    counter = OpCounter(strict_to=strict_to, track=(model, inputs) if track else None)
    phases: list[OpCounts] = []

    def close_phase(module, args, output):
        phases.append(counter.take())

    handle = model.register_forward_hook(close_phase, always_call=True)
    try:
        with torch.no_grad(), counter:
            sequences = model.generate(**inputs, **kwargs)
    finally:
        handle.remove()
    if not phases:
        raise RuntimeError("generate() ran no forward of the model")
    return PrefillDecodeCounts(prefill=phases[0], decode=phases[1:], sequences=sequences)
