"""Which checkpoint of a save folder is complete, and the newest one that is.

A node that dies while a checkpoint is being written leaves a ``global_stepN`` folder with some of its
files, or with some cut short. A resume must not take it.

* **Manifest.** After every rank has saved, rank 0 writes ``MANIFEST_FILE`` into the step folder, atomically
  and last, as DeepSpeed writes ``latest``. It lists every file of the folder with its size, as each node
  saw them. A folder with a manifest is complete when every file it lists is there, a regular file, with that
  size.
* **No manifest.** Older checkpoints and DeepSpeed's own have none. They are checked by presence and
  readability: every model-state file and optimizer shard that the saved layout implies is present, and
  each one's pickle opens. A checkpoint whose model states say a manifest was going to be written
  (``MANIFEST_KEY``) but has none did not finish its save.

``newest_complete`` walks the ``global_stepN`` folders from the newest down and takes the first complete one;
each one skipped is reported in one line naming what is missing.
"""

from __future__ import annotations

import json
import os
import re
import stat
from typing import Any, Callable, Iterable

from megatron_ucp.atomic import atomic_write
from megatron_ucp.checkpoint.format import (
    metadata_from_state,
    model_states_name,
    optim_states_name,
    read_json,
    zero3_model_states_name,
)
from megatron_ucp.checkpoint.trust import CheckpointError, check_name, load_file, one_line

MANIFEST_FILE = "megatron_ucp_manifest.json"
MANIFEST_VERSION = 1
MANIFEST_KIND = "megatron_ucp checkpoint manifest"
MANIFEST_KEY = "manifest"  # in the client state of a save that writes a manifest: its file name
STEP_FOLDER_RE = re.compile(r"^global_step(\d+)$")
_SHOWN = 4  # missing files named in one line; the rest are counted


def listing(folder: str) -> dict[str, int]:
    """Every regular file directly in ``folder`` (a step folder is flat), name -> size; links are left out."""
    out = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name != MANIFEST_FILE and entry.is_file(follow_symlinks=False):
                out[entry.name] = entry.stat(follow_symlinks=False).st_size
    return out


def merged_listing(listings: Iterable[dict[str, int] | None], folder: str) -> dict[str, int]:
    """The union of the nodes' listings of one step folder; one file seen with two sizes is an error."""
    files: dict[str, int] = {}
    for seen in listings:
        for name, size in (seen or {}).items():
            if files.setdefault(name, size) != size:
                raise CheckpointError(f"{os.path.join(folder, name)}: nodes see sizes {files[name]} and {size}; "
                                      "the save is not consistent, no manifest written")
    return files


def write_manifest(folder: str, files: dict[str, int], iteration: int, topology: dict[str, int]) -> str:
    """Write ``folder``'s manifest (atomically) and return its path."""
    doc = {"kind": MANIFEST_KIND, "version": MANIFEST_VERSION, "iteration": iteration, "topology": topology,
           "files": dict(sorted(files.items()))}
    return atomic_write(os.path.join(folder, MANIFEST_FILE), json.dumps(doc, indent=1) + "\n")


def read_manifest(folder: str) -> dict[str, int]:
    """The files (name -> size) ``folder``'s manifest lists, checked: a plain name each, a size >= 0."""
    path = os.path.join(folder, MANIFEST_FILE)
    doc = read_json(path, "a checkpoint manifest")
    if not isinstance(doc, dict) or doc.get("kind") != MANIFEST_KIND:
        raise CheckpointError(f"{path}: not a checkpoint manifest (no kind {MANIFEST_KIND!r})")
    if doc.get("version") != MANIFEST_VERSION:
        raise CheckpointError(f"{path}: manifest version {doc.get('version')!r}, this megatron_ucp reads "
                              f"{MANIFEST_VERSION}")
    files = doc.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path}: 'files' is not a non-empty object")
    for name, size in files.items():
        check_name(name, path, "file name")
        if type(size) is not int or size < 0:
            raise CheckpointError(f"{path}: files[{name!r}]: expected a size >= 0, found {size!r}")
    return files


def _missing_text(folder: str, missing: list[str], what: str = "missing") -> str:
    shown = ", ".join(missing[:_SHOWN]) + (f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else "")
    return f"{folder}: {what} {shown}"


def _manifest_problem(folder: str) -> str | None:
    try:
        files = read_manifest(folder)
    except CheckpointError as e:
        return str(e)
    missing, wrong = [], []
    for name, size in sorted(files.items()):
        try:
            st = os.lstat(os.path.join(folder, name))
        except FileNotFoundError:
            missing.append(name)
            continue
        if not stat.S_ISREG(st.st_mode):
            wrong.append(f"{name} (not a regular file)")
        elif st.st_size != size:
            wrong.append(f"{name} ({st.st_size} bytes, the manifest says {size})")
    if missing:
        return _missing_text(folder, missing)
    return _missing_text(folder, wrong, "changed since the save:") if wrong else None


def implied_files(folder: str) -> tuple[list[str], bool]:
    """(the model-state and optimizer files the saved layout implies, whether it promised a manifest), read
    from the folder's first model-state file (our metadata, else DeepSpeed's own counts)."""
    names = sorted(os.listdir(folder))
    first = next((n for n in names if n == model_states_name(0) or n == zero3_model_states_name(0)), None)
    if first is None:
        raise CheckpointError(f"{os.path.join(folder, model_states_name(0))}: missing file")
    path = os.path.join(folder, first)
    state = load_file(path, meta=True)
    meta = metadata_from_state(state, path)
    promised = isinstance(state, dict) and state.get(MANIFEST_KEY) == MANIFEST_FILE
    zero3 = first != model_states_name(0)
    if meta is not None and meta.topology is not None and meta.zero_stage is not None:
        top = meta.topology
        mp, dp = top.model_parallel_size, top.degree("dp") * top.degree("sp")  # DeepSpeed's data axis is dp x sp
        bf16 = meta.dtype == "bf16"
    else:  # DeepSpeed's own: its counts (a missing mp rank shows as a gap in the names present)
        mp = int(state.get("mp_world_size") or 1)
        dp = int(state.get("dp_world_size") or 1)
        bf16 = any(n.startswith("bf16_zero_") for n in names)
    want = []
    for m in range(mp):
        want += [zero3_model_states_name(m, d) for d in range(dp)] if zero3 else [model_states_name(m)]
        want += [optim_states_name(m, d, bf16) for d in range(dp)]
    return want, promised


def checkpoint_problem(folder: str) -> str | None:
    """Why ``folder`` is not a complete checkpoint (one line naming what is missing or wrong), or None."""
    if os.path.lexists(os.path.join(folder, MANIFEST_FILE)):
        return _manifest_problem(folder)
    try:
        want, promised = implied_files(folder)
        present = set(os.listdir(folder))
        missing = [n for n in want if n not in present]
        if missing:
            return _missing_text(folder, missing)
        if promised:
            return f"{folder}: no {MANIFEST_FILE} (the save did not finish)"
        for name in want:  # readability: each pickle opens (its tensor bytes are not read)
            load_file(os.path.join(folder, name), meta=True)
    except (CheckpointError, OSError) as e:
        return one_line(e)
    return None


def step_folders(load_dir: str) -> list[tuple[int, str]]:
    """(iteration, path) of every ``global_stepN`` folder in ``load_dir`` (links left out), newest first."""
    found = []
    with os.scandir(load_dir) as entries:
        for entry in entries:
            m = STEP_FOLDER_RE.match(entry.name)
            if m and entry.is_dir(follow_symlinks=False):
                found.append((int(m.group(1)), entry.path))
    return sorted(found, reverse=True)


def newest_complete(load_dir: str, say: Callable[[str], Any] = lambda _: None) -> str | None:
    """The newest complete ``global_stepN`` folder of ``load_dir``; None when it has no step folder at all.

    Each incomplete one is skipped with ``say("skipping incomplete checkpoint <why>")``. When there are step
    folders but none is complete, the newest one's problem is raised (a ``CheckpointError``): a folder of
    broken checkpoints is not a fresh start."""
    folders = step_folders(load_dir) if os.path.isdir(load_dir) else []
    first_problem = None
    for _, folder in folders:
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        say(f"skipping incomplete checkpoint {problem}")
        first_problem = first_problem or problem
    if first_problem is not None:
        raise CheckpointError(f"{first_problem}; nothing to resume from")
    return None
