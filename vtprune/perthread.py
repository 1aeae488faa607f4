"""Per-thread attributes: the per-call state of one patched model, private to each calling thread.

A patched model may serve several threads at once (a web server, a thread pool of requests). Every
value vtprune keeps for one call (the prefill's `Session`, the last image encoding, a scorer's debug
records, a method stage's running tracker) is declared on its class as a `PerThread` attribute, so each
thread reads and writes its own copy and no call sees another's. Configuration (what was applied) stays
an ordinary shared attribute.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_LOCAL = "_vtprune_per_thread"


class _Store(threading.local):
    """One object's per-thread values. A copy (``copy.deepcopy``, pickle) of the object it belongs to
    starts empty: per-call state is never copied, and a ``threading.local`` could not be."""

    def __deepcopy__(self, memo: dict) -> _Store:
        return _Store()

    def __reduce__(self):
        return (_Store, ())


def _local(obj: Any) -> threading.local:
    store = vars(obj).get(_LOCAL)
    if store is None:  # dict.setdefault is atomic: two threads racing here get the same object
        store = vars(obj).setdefault(_LOCAL, _Store())
    return store


class PerThread:
    """A data descriptor: each thread sees its own value of this attribute on each instance.

    Args:
        default: the value a thread sees before it assigns one (shared: use ``factory`` for mutable ones).
        factory: called once per thread and instance to make that thread's first value instead.
        shared_fallback: a thread that never assigned a value sees the value most recently assigned by any
            thread (for results read after the call, possibly from another thread: `vtprune.stats`).
    """

    def __init__(self, default: Any = None, *, factory: Callable[[], Any] | None = None,
                 shared_fallback: bool = False) -> None:
        self.default, self.factory, self.shared_fallback = default, factory, shared_fallback
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        store = _local(obj)
        try:
            return getattr(store, self.name)
        except AttributeError:
            pass
        if self.shared_fallback and self.name in vars(obj).get(_LOCAL + "_latest", {}):
            return vars(obj)[_LOCAL + "_latest"][self.name]
        value = self.factory() if self.factory is not None else self.default
        if self.factory is not None:
            setattr(store, self.name, value)
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(_local(obj), self.name, value)
        if self.shared_fallback:
            vars(obj).setdefault(_LOCAL + "_latest", {})[self.name] = value


class PerThreadAttributes:
    """Make attributes ``names`` of one object per-thread while patched; ``remove()`` undoes it.

    For state a library keeps on a module between calls (transformers' Qwen-VL models keep the prefill's
    ``rope_deltas`` on the model for the decode steps that follow): the instance gets a subclass of its
    own class carrying a `PerThread` descriptor per name (a data descriptor wins over the instance
    dictionary), so concurrent calls from several threads keep their own values. Each thread starts
    from None (a prefill sets it). Only this instance changes; ``isinstance`` checks still hold.
    """

    def __init__(self, obj: Any, names: list[str]) -> None:
        self.obj, self.cls = obj, type(obj)
        namespace: dict[str, Any] = {name: PerThread() for name in names}
        namespace["__module__"] = self.cls.__module__
        namespace["__qualname__"] = self.cls.__qualname__
        sub = type(self.cls.__name__, (self.cls,), namespace)
        for name, descriptor in namespace.items():
            if isinstance(descriptor, PerThread):
                descriptor.__set_name__(sub, name)
        obj.__class__ = sub

    def remove(self) -> None:
        if type(self.obj).__mro__[1] is self.cls:
            self.obj.__class__ = self.cls
        for key in [k for k in vars(self.obj) if k.startswith(_LOCAL)]:  # the object is as it was
            del vars(self.obj)[key]
