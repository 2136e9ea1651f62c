"""megatron_ucp.training.memory: the peak an iteration adds above what it began with, on the CPU."""

from __future__ import annotations

import sys

import pytest
import torch

from megatron_ucp.training.memory import MIB, IterationMemory, MemorySample, memory_line

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")


def _touch(mib: int) -> None:
    x = torch.ones(mib * MIB // 4)  # every page written
    x += 1
    del x


def test_cpu_peak_counts_a_freed_temporary_and_a_reused_page():
    m = IterationMemory(torch.device("cpu"))
    _touch(96)  # freed before start(): the trim gives it back, so touching it again counts again
    m.start()
    _touch(96)
    s = m.stop()
    assert s is not None and s.source == "cpu rss"
    assert 90 * MIB <= s.added < 160 * MIB  # within a page table's worth of other pages coming and going
    # Negative control: an iteration that allocates nothing big adds far less.
    m.start()
    torch.ones(16).sum()
    quiet = m.stop()
    assert quiet is not None and quiet.added < 32 * MIB
    assert m.stop() is None  # stop() without start(): nothing measured


def test_memory_line_format():
    line = memory_line(3, 7, MemorySample(held=512 * MIB, peak=800 * MIB + MIB // 2, source="cpu rss"))
    assert line == (" memory | rank 3 | iteration 7 | held MiB: 512.0 | peak MiB: 800.5 | added MiB: 288.5 | "
                    "source: cpu rss |")
    assert MemorySample(10, 4, "cuda allocated").added == 0
