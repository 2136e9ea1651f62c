"""Peak memory of one training iteration on this rank, above what the rank held when it began.

``IterationMemory.start()`` before an iteration, ``.stop()`` after it: the second returns a
``MemorySample`` with ``held`` (bytes in use at the start: weights, gradients, optimizer state,
buffers, once the first iteration has allocated them) and ``peak`` (the most in use during the
iteration); ``peak - held`` is what the iteration added at its worst: activations saved for the
backward pass plus transients (gradients being formed, communication buffers).

Two sources, one per device:

* CUDA: ``torch.cuda.memory_allocated`` at the start, ``torch.cuda.max_memory_allocated`` after
  ``torch.cuda.reset_peak_memory_stats``: exactly the bytes of live tensors, the caching
  allocator's reserve left out.
* CPU: the process's resident set, from ``/proc/self/status``: ``VmRSS`` at the start and ``VmHWM``
  (its high-water mark) at the end, the mark reset at the start by writing ``5`` to
  ``/proc/self/clear_refs`` (Linux >= 4.0). PyTorch's CPU allocator keeps no statistics and no cache
  of its own (it calls ``posix_memalign``/``free``), so the resident set is what the tensors occupy,
  plus what glibc's malloc keeps after a ``free``. That last part would hide memory an iteration
  re-uses, so ``start()`` first asks glibc to give free pages back (``malloc_trim(0)``); then the
  start's resident set is the live memory, and each page the iteration touches again counts.
  The rise also includes the rank's other native allocations (gloo buffers, OpenMP scratch), which
  are transient memory of the iteration as well. Without ``/proc`` (not Linux) there is no CPU
  measurement and ``stop()`` returns None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

import torch

STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"
MIB = 1024 * 1024


@dataclass(frozen=True)
class MemorySample:
    held: int  # bytes in use when the iteration began
    peak: int  # the most bytes in use during it
    source: str  # "cuda allocated" | "cpu rss"

    @property
    def added(self) -> int:
        """Bytes the iteration added at its peak (activations and transients)."""
        return max(0, self.peak - self.held)


def _status_kib(field: str) -> int | None:
    try:
        with open(STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to give back this way
        pass


class IterationMemory:
    """Peak-memory sampling around one iteration (see the module docstring for what is measured)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._held: int | None = None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._held = torch.cuda.memory_allocated()
            return
        _malloc_trim()
        try:
            with open(CLEAR_REFS, "w") as f:
                f.write("5")
        except OSError:
            self._held = None
            return
        rss = _status_kib("VmRSS")
        self._held = None if rss is None else rss * 1024

    def stop(self) -> MemorySample | None:
        held, self._held = self._held, None
        if held is None:
            return None
        if self.cuda:
            torch.cuda.synchronize()
            return MemorySample(held, torch.cuda.max_memory_allocated(), "cuda allocated")
        hwm = _status_kib("VmHWM")
        return None if hwm is None else MemorySample(held, hwm * 1024, "cpu rss")


def memory_line(rank: int, iteration: int, sample: MemorySample) -> str:
    """The trainer's per-rank line (``tools/benchmark_training.py`` parses it: ``MEMORY_RE``)."""
    return (f" memory | rank {rank} | iteration {iteration} | held MiB: {sample.held / MIB:.1f} | "
            f"peak MiB: {sample.peak / MIB:.1f} | added MiB: {sample.added / MIB:.1f} | source: {sample.source} |")
