"""The one way this project writes a file in place: readers see the old content or the new, never a part.

The data goes to a temporary sibling (same folder, so the rename stays on one file system), is flushed
to disk, and is renamed over the target; on any error the temporary is removed and the target is left
as it was. ``checkpoint.publish`` does the same for whole folders and cleans up temporaries that
killed processes left, by the name pattern of ``temporary_name``.

No write goes through a link someone planted:

* a temporary is a fresh name, ``<out>.tmp-<host>-<pid>-r<random hex>``, created exclusively
  (``O_CREAT | O_EXCL | O_NOFOLLOW``, or ``mkdir`` for a folder): whatever already exists under
  that name, a symbolic link included, is never opened; another fresh name is tried instead, and
  after a few collisions the write is refused with one line;
* the temporary is created, renamed and (on failure) removed relative to one open handle of the
  target's folder, so all three act in the same folder even if its path changes meanwhile;
* the rename replaces a link at the target itself; it never writes to where that link points.

The target's folder itself is reached by following its path as given: a folder the caller names
(a ``--save`` folder that links to scratch storage, say) is the caller's choice. What is guarded
are the names this module makes inside it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
from typing import IO, Any, Callable, Iterator, TypeVar

HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"  # safe inside a file name
T = TypeVar("T")
_TRIES = 16  # fresh names tried before giving up (a collision of random names is next to impossible)


def temporary_name(out: str) -> str:
    """This process's temporary-name prefix for ``out``: ``<out>.tmp-<host>-<pid>``.

    The prefix is predictable; what this module creates adds a random part (``fresh_temporary_name``).
    ``checkpoint.publish.remove_stale_temporaries`` recognises both forms by their host and process id."""
    return f"{out}.tmp-{HOST}-{os.getpid()}"


def _random_part() -> str:
    return secrets.token_hex(6)


def fresh_temporary_name(out: str) -> str:
    """``<out>.tmp-<host>-<pid>-r<12 random hex digits>``: a name no one can plant anything at in advance
    (the ``r`` keeps the random part from reading as a process id)."""
    return f"{temporary_name(out)}-r{_random_part()}"


def _collisions(out: str) -> OSError:
    return FileExistsError(errno.EEXIST, f"{_TRIES} fresh temporary names for it were all taken already; refusing "
                                         "to write through something planted there", out)


def _create_fresh(out: str, create: Callable[[str], T], path: str) -> tuple[str, T]:
    """(name, ``create(name)``) for the first fresh temporary name of ``out`` that ``create`` makes without
    finding it taken (``FileExistsError``); ``path`` is named if ``_TRIES`` names all are."""
    for _ in range(_TRIES):
        name = fresh_temporary_name(out)
        try:
            return name, create(name)
        except FileExistsError:
            continue
    raise _collisions(path)


def make_temporary_folder(out: str) -> str:
    """Create and return an empty, fresh temporary sibling folder of ``out`` (``mkdir`` never follows a link);
    the parent folder is made when missing."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    return _create_fresh(out, os.mkdir, out)[0]


def _open_exclusive(dir_fd: int, base: str, mode: str, path: str) -> tuple[str, int]:
    """(name, descriptor) of a new file in the folder ``dir_fd``, never an existing entry or a link."""
    flags = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_RDWR if "+" in mode else os.O_WRONLY)
    return _create_fresh(base, lambda name: os.open(name, flags, 0o666, dir_fd=dir_fd), path)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", fsync: bool = True, **open_args: Any) -> Iterator[IO]:
    """``open(path, mode)`` whose content appears at ``path`` only when the block completes.

    A link at ``path`` is replaced by the new file, not written through."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes whole files; mode {mode!r} is not a write mode")
    path = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(path))
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tmp, fd = _open_exclusive(dir_fd, base, mode, path)
        try:
            try:
                f = os.fdopen(fd, mode, **open_args)
            except BaseException:
                os.close(fd)
                raise
            with f:
                yield f
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, base, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        if fsync:
            with contextlib.suppress(OSError):  # the rename itself on disk; not every file system syncs folders
                os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: str | os.PathLike, data: str | bytes, fsync: bool = True) -> str:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; return the path."""
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return os.fspath(path)
