"""Peak memory of a block of work, without psutil.

- **CUDA**: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the start of the
  block: the peak of tensor memory on the device, weights included (measure ``"cuda-max-allocated"``).
- **CPU on Linux**: the process's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``) is
  reset at the start of the block (writing ``5`` to ``/proc/self/clear_refs``) and the result is
  ``VmHWM`` at the end minus ``VmRSS`` at the start: the extra resident memory the block needed
  (measure ``"cpu-rss-peak-delta"``). Free heap memory is first handed back to the OS (glibc
  ``malloc_trim``); what the allocator still keeps from earlier blocks can be reused without growing
  the RSS, so this is a lower bound of the block's working memory, most useful for comparing
  settings run the same way.
- **CPU elsewhere** (no writable ``clear_refs``): the growth of ``resource.getrusage().ru_maxrss``, the
  lifetime peak, over the block (measure ``"cpu-maxrss-growth"``; 0 once an earlier block peaked higher).
"""

from __future__ import annotations

import re
import sys

import torch

_MIB = 1024 * 1024


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s*kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _trim_heap() -> None:
    """Hand memory freed by earlier work back to the OS (glibc ``malloc_trim``), so it is not reused unseen."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.mib``: the block's peak memory in MiB (see module)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.measure = ""
        self.mib: float | None = None
        self._base = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.measure = "cuda-max-allocated"
            return self
        _trim_heap()
        if _reset_hwm() and _proc_status_kib("VmRSS") is not None:
            self._base = _proc_status_kib("VmRSS") * 1024
            self.measure = "cpu-rss-peak-delta"
        else:
            self._base = _maxrss_bytes()
            self.measure = "cpu-maxrss-growth"
        return self

    def __exit__(self, *exc) -> None:
        if self.measure == "cuda-max-allocated":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.measure == "cpu-rss-peak-delta":
            peak = (_proc_status_kib("VmHWM") or 0) * 1024 - self._base
        else:
            peak = _maxrss_bytes() - self._base
        self.mib = max(0, peak) / _MIB


def memory_measure(device: torch.device | str) -> str:
    """The name of the measure `PeakMemory` uses on ``device`` (recorded in results.json)."""
    with PeakMemory(device) as m:
        pass
    return m.measure
