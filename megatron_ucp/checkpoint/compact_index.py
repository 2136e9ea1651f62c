"""A compact index of a ZeRO-1/2 checkpoint's model states and optimizer shards, written once at save time.

Indexing a checkpoint (``zero.open_zero_checkpoint``) needs a few entries of every model-state file
(``zero.MODEL_STATE_INDEX_KEYS``: counters, degrees, ``param_shapes``, metadata) and every optimizer
shard's header: its parameters' fragment addresses, where its flat partitions lie in the file, its
step. At TP8 PP8 DP16 every rank that resumes would open and unpickle 64 model-state files (each with
all 16 DP ranks' RNG states) and 1,024 shards for them. Rank 0 therefore writes those entries and
headers (``zero.ShardHeader``, per shard) into one JSON file beside them, ``zero_index.json``, which
every rank then reads once instead.

The file is untrusted input like every other file of a checkpoint, and it is only a shortcut: the
files stay the source of truth. It is used only when it is valid against the folder it sits in:

* its format name and version are ours (``VERSION``);
* it names exactly the folder's model-state and optimizer files (plain names, no path), each with the size and
  modification time that file has now (a file rewritten since the index was written does not match;
  nor does a copy that did not keep the times, which then reads the files);
* every flat partition lies inside its file, every fragment address is a pair of counts, every
  parameter name passes ``trust.check_name``, every dtype is one we read, and the model states' entries
  pass the checks their files' would (``format.check_model_states``, our metadata's ``from_dict``).

Otherwise it is ignored and the files are read, and the index says why (``ZeroCheckpoint.index_note``:
``file headers (<index file>: <what is wrong>)``). What it cannot detect is a consistent lie inside
those bounds (an offset moved to other bytes of the same file), which a tampered header could tell as well.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from megatron_ucp.atomic import atomic_write
from megatron_ucp.checkpoint.format import (
    METADATA_KEY,
    MOMENT_KEYS,
    STATE_KEYS,
    check_model_states,
    metadata_from_state,
    model_states_name,
    read_json,
)
from megatron_ucp.checkpoint.trust import CheckpointError, check_name
from megatron_ucp.checkpoint.zero import (
    MODEL_FILE_RE,
    MODEL_STATE_INDEX_KEYS,
    OPTIM_FILE_RE,
    ZERO3_MODEL_FILE_RE,
    FlatRef,
    ShardHeader,
    open_zero_checkpoint,
    read_shard_header,
)

COMPACT_INDEX_FILE = "zero_index.json"
FORMAT = "megatron_ucp.zero_index"
VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _step_record(value) -> Any:
    """A step as JSON: null, a number, or a 0-d tensor's value and dtype."""
    if value is None or not torch.is_tensor(value):
        return value
    return {"value": value.item(), "dtype": _dtype_name(value.dtype)}


def file_stamp(path: str) -> tuple[int, int]:
    """(size, modification time in ns) of a file: a shard rewritten after the index was written does not match."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def shard_record(stamp: tuple[int, int], header: ShardHeader) -> dict:
    """One shard's entry: its file's size and modification time, and its header, per optimizer group."""
    groups = []
    for refs, mapping, step in zip(header.refs, header.mappings, header.steps):
        entry: dict[str, Any] = {key: [refs[key].offset, refs[key].numel, _dtype_name(refs[key].dtype)]
                                 for key in STATE_KEYS}
        entry["step"] = _step_record(step)
        entry["params"] = [[name, start, numel] for name, (start, numel) in mapping.items()]
        groups.append(entry)
    return {"size": stamp[0], "mtime_ns": stamp[1], "zero_stage": header.zero_stage, "param_groups": list(header.groups),
            "groups": groups}


def _plain(value: Any) -> Any:
    """A model-state entry as JSON data (shapes and tuples as lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise CheckpointError(f"a model-state entry of type {type(value).__name__} is not JSON data")


# Entries the index reads of mp rank 0's model-state file alone (``ZeroCheckpoint``: its metadata, its
# ``universal_checkpoint_info``, DeepSpeed's ``num_experts``): the other files' entries leave them out.
FIRST_FILE_ONLY = ("universal_checkpoint_info", "num_experts", METADATA_KEY)


def model_record(stamp: tuple[int, int], state: dict, first: bool) -> dict:
    """One model-state file's entry: its size and modification time, and the entries the index uses of it
    (``first``: of mp rank 0's file)."""
    entries = {key: _plain(state[key]) for key in MODEL_STATE_INDEX_KEYS
               if key in state and (first or key not in FIRST_FILE_ONLY)}
    if "param_shapes" in entries:  # [{name: shape}] -> [[[name, shape], ...]]: JSON keeps no duplicate names
        entries["param_shapes"] = [[[name, shape] for name, shape in group.items()]
                                   for group in entries["param_shapes"]]
    return {"size": stamp[0], "mtime_ns": stamp[1], "entries": entries}


def compact_index(shards: dict[str, tuple[tuple[int, int], ShardHeader]],
                  models: dict[str, tuple[tuple[int, int], dict]]) -> dict:
    """The index of shards ``{file name: (its file_stamp, header)}`` and model-state files ``{file name: (its
    file_stamp, its state)}``, as JSON data."""
    return {"format": FORMAT, "version": VERSION,
            "model_states": {name: model_record(stamp, state, name == model_states_name(0))
                             for name, (stamp, state) in sorted(models.items())},
            "shards": {name: shard_record(stamp, header) for name, (stamp, header) in sorted(shards.items())}}


def write_compact_index(folder: str) -> str | None:
    """Index the ZeRO-1/2 checkpoint ``folder`` from its files and write ``zero_index.json`` into it
    atomically; return its path. None, writing nothing, for a folder without optimizer shards (ZeRO-0) or
    of ZeRO-3 (whose index is computed from the model states, not read from the shards). Called by one
    rank after every rank has saved."""
    names = os.listdir(folder)
    if not any(OPTIM_FILE_RE.match(n) for n in names) or any(ZERO3_MODEL_FILE_RE.match(n) for n in names):
        return None
    ckpt = open_zero_checkpoint(folder, compact=False)
    shards = {os.path.basename(p): (file_stamp(p), read_shard_header(p)) for p in ckpt.optim_files.values()}
    models = {os.path.basename(p): (file_stamp(p), state) for p, state in zip(ckpt.model_files, ckpt.model_states)}
    return write_index(ckpt.folder, shards, models)


def write_index(folder: str, shards: dict[str, tuple[tuple[int, int], ShardHeader]],
                models: dict[str, tuple[tuple[int, int], dict]]) -> str:
    """Write ``compact_index(shards, models)`` into ``folder`` atomically; return its path."""
    target = os.path.join(folder, COMPACT_INDEX_FILE)
    atomic_write(target, json.dumps(compact_index(shards, models), separators=(",", ":")))
    return target


# --- reading ---------------------------------------------------------------------------------------


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{where}: expected a count, found {value!r:.40}")
    return value


def _list(value: Any, where: str, length: int | None = None) -> list:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise CheckpointError(f"{where}: expected a list{'' if length is None else f' of {length}'}, "
                              f"found {value!r:.40}")
    return value


def _dict(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: expected an object, found {value!r:.40}")
    return value


def _flat_ref(value: Any, path: str, size: int, where: str) -> FlatRef:
    offset, numel, dtype = _list(value, where, 3)
    if dtype not in _DTYPES:
        raise CheckpointError(f"{where}: dtype {dtype!r:.40} is not one of {sorted(_DTYPES)}")
    ref = FlatRef(path, _count(offset, f"{where}[0]"), _count(numel, f"{where}[1]"), _DTYPES[dtype])
    end = ref.offset + ref.numel * ref.dtype.itemsize
    if end > size:
        raise CheckpointError(f"{where}: [{ref.offset}, {end}) runs past the end of {os.path.basename(path)} "
                              f"({size} bytes)")
    return ref


def _step(value: Any, where: str):
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    d = _dict(value, where)
    if set(d) != {"value", "dtype"} or d["dtype"] not in _DTYPES or not isinstance(d["value"], (int, float)) \
            or isinstance(d["value"], bool):
        raise CheckpointError(f"{where}: expected a step (a number, or its value and dtype), found {value!r:.60}")
    return torch.tensor(d["value"], dtype=_DTYPES[d["dtype"]])


def _check_stamp(record: dict, path: str, where: str) -> int:
    """The file's size, when it still has the size and modification time ``record`` gives."""
    size = _count(record.get("size"), f"{where}.size")
    stamp = (size, _count(record.get("mtime_ns"), f"{where}.mtime_ns"))
    now = file_stamp(path)
    if stamp != now:
        raise CheckpointError(f"{where}: records a file of {size} bytes modified at {stamp[1]} ns, but it has "
                              f"{now[0]} bytes modified at {now[1]} ns (changed or copied since the index was written)")
    return size


def _model_state(record: Any, path: str, where: str, first: bool) -> dict:
    record = _dict(record, where)
    _check_stamp(record, path, where)
    state = dict(_dict(record.get("entries"), f"{where}.entries"))
    allowed = set(MODEL_STATE_INDEX_KEYS) - (set() if first else set(FIRST_FILE_ONLY))
    unknown = sorted(set(state) - allowed)
    if unknown:
        raise CheckpointError(f"{where}.entries: unknown key {unknown[0][:40]!r}")
    if "param_shapes" in state:
        groups = []
        for g, group in enumerate(_list(state["param_shapes"], f"{where}.param_shapes")):
            shapes: dict[str, torch.Size] = {}
            for i, entry in enumerate(_list(group, f"{where}.param_shapes[{g}]")):
                name, shape = _list(entry, f"{where}.param_shapes[{g}][{i}]", 2)
                if not isinstance(name, str) or name in shapes:
                    raise CheckpointError(f"{where}.param_shapes[{g}][{i}]: a name that is not a string, or repeated")
                check_name(name, where)
                shapes[name] = torch.Size([_count(d, f"{where}.param_shapes[{g}][{i}]") for d in
                                           _list(shape, f"{where}.param_shapes[{g}][{i}]")])
            groups.append(shapes)
        state["param_shapes"] = groups
    check_model_states(state, where)
    if first:
        metadata_from_state(state, where)  # checked here, so that a bad one is the index's fault, not the load's
    return state


def _header(record: Any, path: str, where: str) -> ShardHeader:
    record = _dict(record, where)
    size = _check_stamp(record, path, where)
    param_groups = tuple({"name": _dict(g, f"{where}.param_groups").get("name"), "moe": g.get("moe") is True}
                         for g in _list(record.get("param_groups"), f"{where}.param_groups"))
    for g in param_groups:
        if g["name"] is not None and not isinstance(g["name"], str):
            raise CheckpointError(f"{where}.param_groups: a group name is not a string")
    refs, mappings, steps = [], [], []
    for i, group in enumerate(_list(record.get("groups"), f"{where}.groups")):
        at = f"{where}.groups[{i}]"
        group = _dict(group, at)
        if set(group) != set(STATE_KEYS) | {"step", "params"}:
            raise CheckpointError(f"{at}: expected the keys {sorted(set(STATE_KEYS) | {'step', 'params'})}")
        these = {key: _flat_ref(group[key], path, size, f"{at}.{key}") for key in STATE_KEYS}
        if any(these[key].numel < these["fp32"].numel for key in MOMENT_KEYS):
            raise CheckpointError(f"{at}: a moment's partition is smaller than the fp32 master's")
        mapping: dict[str, tuple[int, int]] = {}
        for j, entry in enumerate(_list(group["params"], f"{at}.params")):
            name, start, numel = _list(entry, f"{at}.params[{j}]", 3)
            if not isinstance(name, str) or name in mapping:
                raise CheckpointError(f"{at}.params[{j}]: a parameter name that is not a string, or repeated")
            check_name(name, at)
            mapping[name] = (_count(start, f"{at}.params[{j}][1]"), _count(numel, f"{at}.params[{j}][2]"))
        refs.append(these)
        mappings.append(mapping)
        steps.append(_step(group["step"], f"{at}.step"))
    stage = _count(record.get("zero_stage"), f"{where}.zero_stage")
    return ShardHeader(stage, param_groups, tuple(mappings), tuple(refs), tuple(steps))


def _entries(records: Any, paths: list[str], index: str, what: str, pattern) -> dict[str, tuple[str, Any]]:
    """``records`` (an object of file name -> record) matched to ``paths``: exactly their names, each a plain
    file name of the kind ``pattern`` matches; {path: (where, record)}."""
    records = _dict(records, f"{index}: {what}")
    by_name = {os.path.basename(p): p for p in paths}
    for name in records:
        if name not in by_name or not pattern.match(name):
            raise CheckpointError(f"{index}: names {name[:80]!r}, not one of this folder's {what} files")
    missing = sorted(set(by_name) - set(records))
    if missing:
        raise CheckpointError(f"{index}: has no entry for {missing[0]}")
    return {by_name[name]: (f"{index}: {name}", record) for name, record in records.items()}


def read_compact_index(folder: str, model_files: list[str],
                       optim_files: dict[Any, str]) -> tuple[list[dict], dict[str, ShardHeader]]:
    """(the model states' index entries, by mp rank; the optimizer shards' headers, by path) of ``folder``'s
    files (``model_files``, ``optim_files``' values: paths in it) from its compact index; a ``CheckpointError``
    naming the index file and what is wrong when it is not valid."""
    path = os.path.join(folder, COMPACT_INDEX_FILE)
    data = _dict(read_json(path, "a compact checkpoint index"), path)
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a {FORMAT} version {VERSION} file (format {data.get('format')!r:.40}, "
                              f"version {data.get('version')!r:.20})")
    models = _entries(data.get("model_states"), model_files, path, "model_states", MODEL_FILE_RE)
    shards = _entries(data.get("shards"), list(optim_files.values()), path, "shards", OPTIM_FILE_RE)
    states = [_model_state(models[p][1], p, models[p][0], mp == 0) for mp, p in enumerate(model_files)]
    return states, {p: _header(record, p, where) for p, (where, record) in shards.items()}


def compact_entries(folder: str, model_files: list[str], optim_files: dict[Any, str]
                    ) -> tuple[tuple[list[dict], dict[str, ShardHeader]] | None, str]:
    """(``read_compact_index``'s entries, or None to read the files; a note saying which): None when
    ``folder`` has no compact index, or an invalid one, whose problem the note then gives."""
    path = os.path.join(folder, COMPACT_INDEX_FILE)
    if not os.path.isfile(path):
        return None, "file headers"
    try:
        return read_compact_index(folder, model_files, optim_files), f"compact index {path}"
    except CheckpointError as e:
        return None, f"file headers ({e})"
