"""Publishing an output folder so that a crash at any instant loses nothing.

Every converter writes its output under a temporary sibling name, verifies it there, writes the
completion marker (``COMPLETE_MARKER``, last, holding the verification result and a manifest of
every file with its size), and only then renames the folder into place:

* killed while writing or verifying, the temporary folder ``<out>.tmp-<host>-<pid>-r<random>`` is all
  that is left; the next run removes it (``remove_stale_temporaries``: only when its process is dead) and
  says so;
* a finished output of the same request is recognised by its marker and kept (``finished_output``),
  so rerunning a command after a crash succeeds;
* ``--overwrite`` replaces only a folder that is an output of the same kind (``replaceable``), by an
  atomic exchange of the two folders (``renameat2(RENAME_EXCHANGE)``), so there is never a moment
  without an output; where the file system cannot exchange, it refuses rather than delete first;
* ``latest_universal`` is written after the rename, atomically, so it only ever names a complete,
  verified folder.

The trainer and the recipes read the marker (``require_verified``) before they resume.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from megatron_ucp.atomic import (  # noqa: F401 - temporary_name: re-exported
    HOST,
    atomic_open,
    atomic_write,
    make_temporary_folder,
    temporary_name,
)
from megatron_ucp.checkpoint.format import read_json, zero_dir
from megatron_ucp.checkpoint.trust import CheckpointError

COMPLETE_MARKER = "megatron_ucp_complete.json"
MARKER_VERSION = 1
LATEST_UNIVERSAL = "latest_universal"
UNIVERSAL_KIND = "universal"  # the completion marker's kind for our converter's output



def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(out: str, say: Callable[[str], None] = _say) -> list[str]:
    """Remove ``<out>.tmp-<host>-<pid>[-r<random>]`` folders (and files) that dead processes of this host left.

    A link left under such a name is removed itself; nothing it points to is touched."""
    parent, base = os.path.split(os.path.abspath(out))
    if not os.path.isdir(parent):
        return []
    # also the names earlier versions used: <out>.tmp-<pid> and <out>.old-<pid>
    pattern = re.compile(re.escape(base) + r"\.(tmp|old)-(?:(?P<host>[A-Za-z0-9_.-]+)-)?(?P<pid>\d+)"
                         r"(?:-r[0-9a-f]+)?$")
    removed = []
    for name in sorted(os.listdir(parent)):
        m = pattern.match(name)
        if not m or (m.group("host") not in (None, HOST)) or _pid_alive(int(m.group("pid"))):
            continue
        path = os.path.join(parent, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
        removed.append(path)
        say(f"removed {path}, left by process {m.group('pid')}, which is no longer running")
    return removed


def fingerprint(paths: list[str]) -> str:
    """A digest of the files' names, sizes and modification times: which input this output came from."""
    h = hashlib.sha256()
    for path in sorted(paths):
        st = os.stat(path)
        h.update(f"{os.path.basename(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def folder_files(folder: str) -> list[str]:
    """Every regular file under ``folder`` (relative paths), except the marker."""
    out = []
    for root, _, files in os.walk(folder):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), folder)
            if rel != COMPLETE_MARKER:
                out.append(rel)
    return sorted(out)


def write_marker(folder: str, kind: str, request: dict, verified: bool, extra: dict | None = None) -> None:
    """The completion marker, written last into the (still temporary) output folder."""
    manifest = {rel: os.path.getsize(os.path.join(folder, rel)) for rel in folder_files(folder)}
    marker = {"format": "megatron_ucp.complete", "version": MARKER_VERSION, "kind": kind, "verified": verified,
              "request": request, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": manifest}
    marker.update(extra or {})
    with atomic_open(os.path.join(folder, COMPLETE_MARKER)) as f:
        json.dump(marker, f, indent=1, sort_keys=True)


def read_marker(folder: str) -> dict | None:
    path = os.path.join(folder, COMPLETE_MARKER)
    if not os.path.isfile(path):
        return None
    marker = read_json(path, "a completion marker")  # nesting bounded: the folder is untrusted
    if not isinstance(marker, dict) or marker.get("format") != "megatron_ucp.complete":
        raise CheckpointError(f"{path}: not a megatron_ucp completion marker")
    return marker


def check_manifest(folder: str, marker: dict) -> None:
    """Every file the marker lists is there with its size, and nothing else was added."""
    files = marker.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{os.path.join(folder, COMPLETE_MARKER)}: no file manifest")
    present = set(folder_files(folder))
    for rel, size in files.items():
        path = os.path.join(folder, rel)
        if rel not in present:
            raise CheckpointError(f"{path}: listed in {COMPLETE_MARKER} but missing")
        if os.path.getsize(path) != size:
            raise CheckpointError(f"{path}: {os.path.getsize(path)} bytes, but {COMPLETE_MARKER} records {size}")
    extra = sorted(present - set(files))
    if extra:
        raise CheckpointError(f"{os.path.join(folder, extra[0])}: not listed in {COMPLETE_MARKER} "
                              f"({len(extra)} such files)")


def require_verified(folder: str) -> dict:
    """The marker of a finished, verified output whose files are all there; else a one-line error."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder")
    marker = read_marker(folder)
    if marker is None:
        raise CheckpointError(f"{folder}: has no {COMPLETE_MARKER}, so it is not a finished, verified conversion "
                              "(convert with tools/ds_to_universal.py, or check a folder written by another "
                              "converter against its input with tools/ds_to_universal.py --certify)")
    if not marker.get("verified"):
        raise CheckpointError(f"{os.path.join(folder, COMPLETE_MARKER)}: the conversion was not verified "
                              "(rerun it without --no-verify)")
    check_manifest(folder, marker)
    return marker


def finished_output(out: str, kind: str, request: dict) -> dict | None:
    """The marker of ``out`` when it is a finished, verified output of this very request."""
    try:
        marker = require_verified(out)
    except CheckpointError:
        return None
    return marker if marker.get("kind") == kind and marker.get("request") == request else None


def check_replaceable(out: str, looks_like: Callable[[str], bool], what: str, overwrite: bool) -> None:
    """Refuse to touch an existing ``out`` unless ``overwrite`` and it is an output of this kind."""
    if not os.path.lexists(out):
        return
    if os.path.islink(out) or not os.path.isdir(out):
        raise CheckpointError(f"{out}: exists and is not a folder; refusing to replace it")
    if not os.listdir(out):
        return
    if not overwrite:
        raise CheckpointError(f"{out}: exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    if not looks_like(out):
        raise CheckpointError(f"{out}: is not {what}; --overwrite replaces only {what}, so it is left as it is")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: str, b: str) -> None:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), a, None, b)


def publish(tmp: str, out: str) -> None:
    """Put the finished folder ``tmp`` at ``out``; an existing ``out`` is swapped out atomically."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    if os.path.isdir(out) and not os.path.islink(out) and not os.listdir(out):
        os.rename(tmp, out)  # replaces an empty folder atomically
        return
    try:
        exchange(tmp, out)
    except OSError as e:
        raise CheckpointError(f"{out}: this file system cannot swap folders atomically ({e.strerror}); refusing to "
                              f"delete the old output before the new one is in place: remove {out} yourself "
                              f"and rerun (the new output was not kept)") from None
    shutil.rmtree(tmp)  # now the old output


@contextmanager
def staged_folder(out: str) -> Iterator[str]:
    """Write a folder as a fresh ``<out>.tmp-<host>-<pid>-r<random>`` and publish it at ``out`` when the
    block completes (the block writes the marker last); if it raises, the temporary folder goes and
    ``out`` stays. The folder is made with ``mkdir`` under a name no one could plant a link at."""
    remove_stale_temporaries(out)
    tmp = make_temporary_folder(out)
    try:
        yield tmp
        if not os.path.isfile(os.path.join(tmp, COMPLETE_MARKER)):
            raise CheckpointError(f"{tmp}: finished without its {COMPLETE_MARKER}; not publishing it")
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_latest_universal(out: str) -> None:
    """``<parent>/latest_universal`` naming the finished folder ``out``, replaced atomically."""
    latest = os.path.join(os.path.dirname(out), LATEST_UNIVERSAL)
    remove_stale_temporaries(latest)  # a process killed while writing it leaves its temporary file
    atomic_write(latest, os.path.basename(out))


def json_safe(d: dict) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


def check_output_path(input_folder: str, output_folder: str) -> tuple[str, str]:
    """Real paths of input and output; the output may neither be inside the input nor contain it."""
    inp = os.path.realpath(input_folder)
    out = os.path.realpath(output_folder.rstrip("/") or output_folder)
    if out == inp or os.path.commonpath([inp, out]) == inp:
        raise CheckpointError(f"{output_folder}: the output may not be inside the input folder {input_folder}")
    if os.path.commonpath([inp, out]) == out:
        raise CheckpointError(f"{output_folder}: the output may not contain the input folder {input_folder}")
    return inp, out


def is_universal_folder(path: str) -> bool:
    """A universal checkpoint folder, ours or DeepSpeed's: ``zero/`` beside model-state files."""
    names = os.listdir(path)
    return os.path.isdir(zero_dir(path)) and any(n.endswith("model_states.pt") for n in names)
