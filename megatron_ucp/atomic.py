"""The one way this project writes a file in place: readers see the old content or the new, never a part.

The data goes to a temporary sibling (same folder, so the rename stays on one file system), is flushed
to disk, and is renamed over the target; on any error the temporary is removed and the target is left
as it was. ``checkpoint.publish`` does the same for whole folders and cleans up temporaries that
killed processes left, by the name pattern of ``temporary_name``.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from typing import IO, Any, Iterator

HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"  # safe inside a file name


def temporary_name(out: str) -> str:
    """This process's temporary sibling of ``out``: ``<out>.tmp-<host>-<pid>``."""
    return f"{out}.tmp-{HOST}-{os.getpid()}"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", fsync: bool = True, **open_args: Any) -> Iterator[IO]:
    """``open(path, mode)`` whose content appears at ``path`` only when the block completes."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes whole files; mode {mode!r} is not a write mode")
    path = os.fspath(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes, fsync: bool = True) -> str:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; return the path."""
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return os.fspath(path)
