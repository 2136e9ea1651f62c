"""Commands watched line by line: a ``torchrun`` agent (or any command) whose output is read as it comes,
each line stamped with ``time.monotonic()``, and killed the way a node dies.

An elastic test or the recovery benchmark (``tools/benchmark_recovery.py``) starts several ``torchrun``
agents (each a "node") on loopback, waits for what they print, kills one the way a node dies, and
watches the others re-form. Three traps, each handled here once:

* torchrun starts every worker in a session of its own, so a signal to the agent's process group does not
  reach its workers. ``Agent.kill()`` freezes the agent (SIGSTOP: it can start no new worker), SIGKILLs
  every descendant it finds by parent, then the agent's own group.
* A pipe nobody reads fills and blocks the writer. A thread per agent reads its output as it comes and
  stamps each line with ``time.monotonic()``; ``Agent.wait_for(regex)`` returns the first matching line
  after a given position, so a caller paces itself by what the job printed, never by sleeping.
* Nothing may outlive its caller: ``agents()`` is a context manager that ends every agent it started, and
  all of their workers, whatever happened inside it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import psutil

from megatron_ucp.launch import start_in_group


@dataclass(frozen=True)
class Line:
    t: float    # time.monotonic() when it was read
    text: str   # without the newline


class Agent:
    """One torchrun agent in its own process group, its stdout and stderr merged and read by a thread."""

    def __init__(self, name: str, cmd: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.started = time.monotonic()
        self.proc = start_in_group(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                   bufsize=1, errors="replace")
        self.lines: list[Line] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for text in self.proc.stdout:
            with self._changed:
                self.lines.append(Line(time.monotonic(), text.rstrip("\n")))
                self._changed.notify_all()
        with self._changed:  # end of output: wake waiters so that they fail now, not at their timeout
            self._changed.notify_all()

    def wait_for(self, pattern: str, *, after: int = 0, timeout_s: float = 300.0) -> tuple[int, Line, re.Match]:
        """The first line at index >= ``after`` that matches ``pattern`` (``re.search``): (index, line, match).

        Raises ``TimeoutError`` after ``timeout_s``, or at once when the agent's output ended without one;
        the message carries the agent's last lines."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self._changed:
            i = after
            while True:
                for i in range(i, len(self.lines)):
                    m = regex.search(self.lines[i].text)
                    if m:
                        return i, self.lines[i], m
                i = len(self.lines)
                left = deadline - time.monotonic()
                if not self._reader.is_alive() or left <= 0:
                    why = "ended" if not self._reader.is_alive() else f"printed none in {timeout_s:.0f} s"
                    raise TimeoutError(f"agent {self.name}: no line matches {pattern!r}; its output {why}:\n"
                                       + self.tail())
                self._changed.wait(min(left, 1.0))

    def tail(self, n: int = 40) -> str:
        with self._changed:
            return "\n".join(f"[{self.name} +{ln.t - self.started:7.2f}s] {ln.text}" for ln in self.lines[-n:])

    def workers(self) -> list[psutil.Process]:
        """Every live descendant of the agent (its workers and anything they started)."""
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> float:
        """SIGKILL the agent and all of its descendants, as a node that dies; the monotonic time of the kill.

        The agent is frozen first so that it cannot start a worker between the listing and the kill."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGSTOP)
        victims = self.workers()
        t = time.monotonic()
        for p in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        psutil.wait_procs(victims, timeout=30)
        self.proc.wait()
        self._reader.join(timeout=30)
        return t

    def alive(self) -> bool:
        return self.proc.poll() is None


@contextlib.contextmanager
def agents() -> Iterator[list[Agent]]:
    """A list to append started ``Agent``s to; on the way out every one of them is killed with its workers."""
    started: list[Agent] = []
    try:
        yield started
    finally:
        for agent in started:
            agent.kill()


def held(agent: Agent, point: str, workers: int, *, after: int = 0, timeout_s: float = 300.0) -> int:
    """Wait until ``workers`` workers of ``agent`` print that they hold at the pacing point ``point``
    (``megatron_ucp.pacing``); the index of the line that completed the count. Workers share the agent's output,
    so a worker's line may land inside another's: each is found anywhere in a line, and counted by its pid."""
    pattern = rf"holding at {re.escape(point)} \(pid (\d+)\)"
    pids: set[str] = set()
    i = after - 1
    while len(pids) < workers:
        i, line, _ = agent.wait_for(pattern, after=i + 1, timeout_s=timeout_s)
        pids.update(re.findall(pattern, line.text))
    return i
