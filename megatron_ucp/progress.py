"""A progress bar in bytes for long file work (checkpoint conversion, loading), drawn only on a terminal.

    with byte_progress(total_bytes, "converting", enabled=not quiet) as bar:
        for piece in pieces:
            ...
            bar.update(piece.nbytes)

The bar (``tqdm``) shows the bytes done out of ``total_bytes``, the percentage, the rate and the time
left, in decimal units (kB, MB, GB: the ones our reports print). It is drawn only when ``enabled`` and
the stream (default ``sys.stderr``, looked up at the call) is a terminal: redirected into a log file or
a pipe, or under pytest's capture, it writes nothing at all. ``update`` may be called from several
threads. Whether drawn or not, the object counts the bytes (``done``), so callers can use it as their
tally. In a job of many processes, pass ``enabled`` only on one of them (rank 0).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import IO, Any

from tqdm import tqdm


def is_terminal(stream: IO[Any] | None) -> bool:
    """Whether ``stream`` is an interactive terminal (a closed or unusual stream counts as not)."""
    try:
        return stream is not None and bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _sized(stream: IO[Any]) -> bool:
    """Whether the terminal reports its size; some (a pty under ``script``, a container's console) report
    0 x 0, on which tqdm draws nothing at all. A stream without a file descriptor counts as sized."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is an OSError
        return True
    return size.columns > 0 and size.lines > 0


# tqdm's default layout, with the unit after the byte counts too ("1.20GB/3.40GB", not "1.20G/3.40G")
_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class ByteProgress:
    """Bytes done out of a total, drawn as a ``tqdm`` bar when ``shown``; see ``byte_progress``."""

    def __init__(self, total_bytes: int, desc: str, enabled: bool = True, file: IO[Any] | None = None,
                 mininterval: float = 0.5) -> None:
        stream = sys.stderr if file is None else file
        self.total = int(total_bytes)
        self.done = 0
        self.shown = bool(enabled) and is_terminal(stream)
        self._lock = threading.Lock()
        self._bar: tqdm | None = None
        if self.shown:
            sized = _sized(stream)  # else a fixed width and height
            self._bar = tqdm(total=self.total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                             file=stream, mininterval=mininterval, dynamic_ncols=sized,
                             ncols=None if sized else 100, nrows=None if sized else 20, leave=True,
                             bar_format=_FORMAT)

    def update(self, nbytes: int) -> None:
        """Count ``nbytes`` more as done (and redraw, at most every ``mininterval`` seconds)."""
        with self._lock:
            self.done += int(nbytes)
            if self._bar is not None:
                self._bar.update(int(nbytes))

    def close(self) -> None:
        """Draw the final state and release the line (idempotent)."""
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def __enter__(self) -> "ByteProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def byte_progress(total_bytes: int, desc: str, enabled: bool = True, file: IO[Any] | None = None) -> ByteProgress:
    """A progress bar over ``total_bytes`` labelled ``desc``: ``.update(nbytes)``, ``.close()``, or use it as
    a context manager. Drawn on ``file`` (default ``sys.stderr``) only when ``enabled`` and ``file`` is a
    terminal; otherwise silent (it still counts ``.done``)."""
    return ByteProgress(total_bytes, desc, enabled=enabled, file=file)
