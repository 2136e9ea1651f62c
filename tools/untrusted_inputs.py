#!/usr/bin/env python
"""Craft malicious or malformed checkpoint inputs from real ones, and measure how tools treat them.

A checkpoint folder is untrusted input as soon as it comes from someone else: ``.pt`` files are
pickles (unpickling one can run any code), names inside them become file paths, and sizes inside
them become allocations. This module makes, as an attacker would with small hand-made files, one
copy of a real checkpoint per kind of attack, each changed in one place:

* a pickle payload in a ZeRO model-state file, in one optimizer shard, in a universal atom, in a
  universal model-state file, or in a Hugging Face ``pytorch_model.bin``;
* a parameter name that is a relative or absolute path (ZeRO), or an HF index / tokenizer file that
  points outside its folder;
* a fragment that runs past its flat partition, or a parameter declared with 2**40 elements.

The crafting functions are a library (``load_tool("untrusted_inputs")`` in the tests); the CLI crafts
every case and runs our tools and DeepSpeed's ``ds_to_universal`` on each, as child processes:

    python tools/untrusted_inputs.py --zero CKPTS/run/global_step2 \\
        --universal CKPTS/run_u/global_step2_universal --hf HF_DIR --work /tmp/untrusted

It prints a markdown table: exit code and outcome per tool, whether the payload ran (its marker file
appeared), whether anything was written outside the output folder, peak RSS and wall time.

How a tool is measured: a small launcher (a bare ``python -S`` running ``_LAUNCHER``, started in its
own session) runs it and reaps it with ``os.wait4``, whose rusage covers the tool and the descendants
it waited for: ``ru_maxrss`` is the largest RSS of any one process of the tool (DeepSpeed's worker
processes included). ``RUSAGE_CHILDREN`` deltas in this process would not work (a running maximum
over every child so far), nor would forking the tool from here (this process's RSS would count).
On timeout the whole session is killed. As a safety net for the machine, tools run with
``RLIMIT_AS`` (16 GiB) and ``RLIMIT_FSIZE`` (2 GiB; these inputs are under 1 MB, so a bigger file
is itself a finding: the write fails with EFBIG, or SIGXFSZ kills the tool).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from megatron_ucp.checkpoint.format import LATEST_FILE, METADATA_KEY
from megatron_ucp.checkpoint.manifest import MANIFEST_FILE, listing, write_manifest
from megatron_ucp.checkpoint.format import MODEL_STATES_RE as MODEL_FILE_RE
from megatron_ucp.checkpoint.format import OPTIM_STATES_RE as OPTIM_FILE_RE
from megatron_ucp.checkpoint.format import ZERO3_MODEL_STATES_RE as ZERO3_MODEL_FILE_RE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PAYLOAD_KEY = "untrusted_extra"  # the key a payload hides under; any name would do
OPTIMIZER_STATE_DICT = "optimizer_state_dict"
PARAM_SLICE_MAPPINGS = "param_slice_mappings"
FP32_PARTITIONS = "single_partition_of_fp32_groups"
LATEST, LATEST_UNIVERSAL = LATEST_FILE, "latest_universal"
HF_WEIGHT_RE = re.compile(r"(\.safetensors|\.bin|\.index\.json)$")

CHILD_ADDRESS_SPACE = 16 << 30
CHILD_FILE_SIZE = 2 << 30


@dataclass
class Crafted:
    name: str  # case id, e.g. "zero_payload_model_states"
    root: str  # folder to pass as --load (holds latest / latest_universal), or the HF folder
    path: str  # the input to hand to the tool: global_stepN, the universal folder, or the HF folder
    bad_file: str  # absolute path of the file that carries the bad content (a tool's error must name it)
    marker: str | None  # the file a pickle payload creates when unpickled (None for non-payload cases)
    escape: str | None  # a path outside any output that a traversal reaches (None for other cases)


# --- pickle payloads ----------------------------------------------------------------------------


class _Payload:
    """Unpickles as a call to ``os.system(command)``: the classic pickle attack, with a harmless command.

    ``os.system`` is pickled by reference as ``posix.system``, so nothing of this module is needed to
    unpickle it; only a loader that refuses that global (``weights_only=True``) is safe from it.
    """

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def payload(marker: str) -> object:
    """An object whose unpickling runs ``touch <marker>``: proof that a loader executed the file."""
    return _Payload("touch " + shlex.quote(os.path.abspath(marker)))


def payload_is_live(path: str, marker: str) -> bool:
    """Whether ``torch.load(path, weights_only=False)`` creates ``marker`` (the marker is removed after).

    The negative control for every payload case: a tool that "did not run the payload" only proves
    something if a plain unpickling of the same file does run it.
    """
    _remove_file(marker)
    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - the payload runs while unpickling, whatever fails later
        pass
    live = os.path.exists(marker)
    _remove_file(marker)
    return live


# --- small file helpers ---------------------------------------------------------------------------


def _load_real(path: str):
    """Read a real checkpoint file to rewrite it, through the same allowlist as every tool (the
    checkpoint crafted from need not be trusted)."""
    from megatron_ucp.checkpoint.trust import load_file

    return load_file(path, mmap=False)


def _remove_file(path: str) -> None:
    if os.path.lexists(path):
        os.remove(path)


def _fresh_dir(path: str) -> str:
    """An empty folder at ``path`` (a previous craft of the same case is replaced)."""
    if os.path.lexists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def _case_dir(work: str, name: str) -> str:
    return _fresh_dir(os.path.join(os.path.abspath(work), name))


def _marker(work: str, name: str) -> str:
    """The payload's marker sits beside the case folder: outside every input and output."""
    return os.path.join(os.path.abspath(work), f"{name}.marker")


def _copy_checkpoint(src: str, root: str, latest_name: str) -> str:
    """Copy the checkpoint folder ``src`` into ``root`` and write ``root/<latest_name>`` naming it.

    ``copytree`` copies each hard link as its own file, which is what the rewrites below want.
    """
    src = os.path.normpath(os.path.abspath(src))
    dst = os.path.join(root, os.path.basename(src))
    shutil.copytree(src, dst)
    with open(os.path.join(root, latest_name), "w") as f:
        f.write(os.path.basename(src))
    return dst


def _sealed(crafted: "Crafted") -> "Crafted":
    """An attacker's checkpoint is consistent with itself: the manifest of the crafted ZeRO folder (when the real
    one has one) is rewritten to list the files as they are now, so the readers' checks of content are what
    meet each case, not the completeness check."""
    manifest = os.path.join(crafted.path, MANIFEST_FILE)
    if os.path.isfile(manifest):
        with open(manifest) as f:
            doc = json.load(f)
        write_manifest(crafted.path, listing(crafted.path), doc["iteration"], doc["topology"])
    return crafted


def _copy_zero(zero_folder: str, work: str, name: str) -> tuple[str, str]:
    root = _case_dir(work, name)
    return root, _copy_checkpoint(zero_folder, root, LATEST)


def _copy_universal(universal_folder: str, work: str, name: str) -> tuple[str, str]:
    root = _case_dir(work, name)
    return root, _copy_checkpoint(universal_folder, root, LATEST_UNIVERSAL)


# --- ZeRO checkpoint layout -----------------------------------------------------------------------


def _model_state_files(folder: str) -> list[str]:
    """The model-state files in mp-rank order: ``mp_rank_XX`` (ZeRO-1/2), else every ZeRO-3 rank's."""
    names = sorted(os.listdir(folder))
    plain = sorted((n for n in names if MODEL_FILE_RE.match(n)), key=lambda n: int(MODEL_FILE_RE.match(n).group(1)))
    if plain:
        return [os.path.join(folder, n) for n in plain]
    zero3 = [n for n in names if ZERO3_MODEL_FILE_RE.match(n)]
    zero3.sort(key=lambda n: tuple(int(g) for g in ZERO3_MODEL_FILE_RE.match(n).groups())[::-1])
    return [os.path.join(folder, n) for n in zero3]


def _optim_files(folder: str, mp: int | None = None) -> list[str]:
    """Optimizer shards ordered by (mp rank, dp rank); only mp rank ``mp`` when given."""
    found = []
    for n in os.listdir(folder):
        if m := OPTIM_FILE_RE.match(n):
            dp, rank = int(m.group(2)), int(m.group(3))
            if mp is None or rank == mp:
                found.append(((rank, dp), os.path.join(folder, n)))
    return [p for _, p in sorted(found)]


def _is_zero3(folder: str) -> bool:
    return not any(MODEL_FILE_RE.match(n) for n in os.listdir(folder))


def _require_stage12(folder: str, what: str) -> None:
    """Slice-mapping attacks need ``param_slice_mappings``, which ZeRO-3 files do not have."""
    if _is_zero3(folder):
        raise ValueError(f"{what} needs a ZeRO-1/2 checkpoint (param_slice_mappings); {folder} is ZeRO-3")


def _first_model_state_file(folder: str) -> str:
    files = _model_state_files(folder)
    if not files:
        raise ValueError(f"{folder}: no model-state files (not a DeepSpeed checkpoint folder?)")
    return files[0]


def _renamed(mapping, old: str, new: str):
    """``mapping`` with key ``old`` renamed to ``new`` in place of order, keeping the mapping's type."""
    return type(mapping)((new if k == old else k, v) for k, v in mapping.items())


def _all_patterns(info: dict) -> list[str]:
    """Every regex in a ``universal_checkpoint_info``: plain pattern lists and sub-parameter patterns."""
    out = []
    for value in info.values():
        if isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    out.append(item)
                elif isinstance(item, dict):
                    out += [p for p in item.get("patterns", []) if isinstance(p, str)]
    return out


def _pick_unpatterned_param(param_shapes: list, info: dict) -> str:
    """A parameter that no pattern names, so renaming it leaves every pattern used exactly as before
    (DeepSpeed's strict mode fails on a pattern that matches nothing). Falls back to the first one."""
    patterns = _all_patterns(info)
    names = [n for group in param_shapes for n in group]
    for n in names:
        if not any(re.match(p, n) for p in patterns):
            return n
    return names[0]


def _extend_patterns_for(info: dict, old: str, new: str) -> None:
    """Where a plain pattern list names ``old``, add one naming ``new``, so ``new`` merges as ``old`` did."""
    for value in info.values():
        if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
            if any(re.match(p, old) for p in value):
                value.append(re.escape(new) + "$")


# --- ZeRO cases -----------------------------------------------------------------------------------


def craft_zero_payload_in_model_states(zero_folder: str, work: str) -> Crafted:
    """The first model-state file gets an extra top-level key holding a payload: the file every
    converter and loader opens first."""
    name = "zero_payload_model_states"
    root, path = _copy_zero(zero_folder, work, name)
    bad = _first_model_state_file(path)
    marker = _marker(work, name)
    state = _load_real(bad)
    state[PAYLOAD_KEY] = payload(marker)
    torch.save(state, bad)
    return _sealed(Crafted(name, root, path, bad, marker, None))


def craft_zero_payload_in_optimizer_shard(zero_folder: str, work: str) -> Crafted:
    """Only the last DP rank's optimizer shard (mp rank 0) is poisoned, nested in its optimizer state:
    a loader that checks just the first shard, or only top-level keys, misses it."""
    name = "zero_payload_optimizer_shard"
    root, path = _copy_zero(zero_folder, work, name)
    bad = _optim_files(path, mp=0)[-1]
    marker = _marker(work, name)
    state = _load_real(bad)
    state[OPTIMIZER_STATE_DICT][PAYLOAD_KEY] = payload(marker)
    torch.save(state, bad)
    return _sealed(Crafted(name, root, path, bad, marker, None))


def craft_zero_traversal(zero_folder: str, work: str, absolute: bool) -> Crafted:
    """One parameter is renamed to a path, in ``param_shapes`` and in every shard's slice mappings.

    Converters turn parameter names into atom folders (``<output>/zero/<name>/``), so the name
    ``../../escape_<x>`` lands beside the output folder and an absolute name anywhere. Our metadata
    is removed so that our converter cannot reject the name from its parameter table and must rely,
    like DeepSpeed, on ``universal_checkpoint_info``, whose patterns are kept consistent with the new
    name. ``escape`` is where the atom folder lands for an output of ``work/<name>_out/<step>_universal``.
    ``bad_file`` is the first optimizer shard (in (mp, dp) order) whose slice mappings hold the name:
    DeepSpeed's first write outside its output uses that name (its ``tmp/<name>/`` fragment dump),
    before the ``param_shapes`` copy of the name is used for the atom folder.

    A ZeRO-3 input works too (beyond the ZeRO-1/2 case this was made for): it has no slice mappings,
    names come from every rank's ``param_shapes`` alone, and ``bad_file`` is DP rank 0's model-state file.
    """
    name = f"zero_traversal_{'absolute' if absolute else 'relative'}"
    root, path = _copy_zero(zero_folder, work, name)
    model_files = _model_state_files(path)
    first = _load_real(model_files[0])
    old = _pick_unpatterned_param(first["param_shapes"], first.get("universal_checkpoint_info") or {})
    work = os.path.abspath(work)
    if absolute:
        new = escape = os.path.join(work, f"{name}_escape", f"escape_{old}")
    else:
        new = f"../../escape_{old}"
        output = os.path.join(work, f"{name}_out", os.path.basename(path) + "_universal")
        escape = os.path.normpath(os.path.join(output, "zero", new))
    for f in model_files:
        state = _load_real(f)
        state.pop(METADATA_KEY, None)
        state["param_shapes"] = [_renamed(g, old, new) for g in state["param_shapes"]]
        if isinstance(state.get("universal_checkpoint_info"), dict):
            _extend_patterns_for(state["universal_checkpoint_info"], old, new)
        torch.save(state, f)
    bad = None
    for f in [] if _is_zero3(path) else _optim_files(path):
        state = _load_real(f)
        osd = state[OPTIMIZER_STATE_DICT]
        if bad is None and any(old in g for g in osd[PARAM_SLICE_MAPPINGS]):
            bad = f
        osd[PARAM_SLICE_MAPPINGS] = [_renamed(g, old, new) for g in osd[PARAM_SLICE_MAPPINGS]]
        torch.save(state, f)
    return _sealed(Crafted(name, root, path, bad or model_files[0], None, escape))


def _last_fragment(mappings: dict):
    """(name, address) of the non-empty fragment that starts last in one group's slice mappings."""
    named = [(n, a) for n, a in mappings.items() if int(a.numel) > 0]
    return max(named, key=lambda na: int(na[1].start))


def craft_zero_fragment_past_partition(zero_folder: str, work: str) -> Crafted:
    """In the last DP rank's shard, the last fragment of group 0 is moved one element past the end of
    its flat fp32 partition: ``start + numel == partition numel + 1``. The smallest overrun, so only
    an exact bounds check catches it (a reader without one reads the neighbouring tensor's bytes)."""
    name = "zero_fragment_past_partition"
    root, path = _copy_zero(zero_folder, work, name)
    _require_stage12(path, "craft_zero_fragment_past_partition")
    bad = _optim_files(path, mp=0)[-1]
    state = _load_real(bad)
    osd = state[OPTIMIZER_STATE_DICT]
    group = osd[PARAM_SLICE_MAPPINGS][0]
    param, addr = _last_fragment(group)
    partition = osd[FP32_PARTITIONS][0].numel()
    group[param] = dataclasses.replace(addr, start=partition - int(addr.numel) + 1)
    torch.save(state, bad)
    return _sealed(Crafted(name, root, path, bad, None, None))


def _single_fragment_param(path: str, shapes: list) -> tuple[str, int, str]:
    """(name, group, shard) of a parameter held whole by one DP rank of mp rank 0, 1-D if possible:
    declaring it huge then needs no other fragment changed. The last DP rank is preferred."""
    holders: dict[str, list[str]] = {}
    shards = _optim_files(path, mp=0)
    for shard in shards:
        for g in _load_real(shard)[OPTIMIZER_STATE_DICT][PARAM_SLICE_MAPPINGS]:
            for n, a in g.items():
                if int(a.numel) > 0:
                    holders.setdefault(n, []).append(shard)
    candidates = [(g, n) for g, group in enumerate(shapes) for n in group if len(holders.get(n, [])) == 1]
    if not candidates:
        raise ValueError(f"{path}: no parameter is held whole by one DP rank")
    one_dim = [(g, n) for g, n in candidates if len(shapes[g][n]) == 1] or candidates
    g, n = max(one_dim, key=lambda gn: shards.index(holders[gn[1]][0]))
    shard = holders[n][0]
    return n, g, shard


def craft_zero_huge_declared(zero_folder: str, work: str, numel: int = 2**40) -> Crafted:
    """One parameter declares ``numel`` elements, consistently: its ``param_shapes`` entry becomes
    ``(numel,)`` and its slice mapping says ``numel`` too, so a converter that only checks that the
    two agree allocates ``numel`` elements (4 TiB of fp32 by default) from a few changed bytes. The
    other parameters are untouched. ``bad_file`` is the optimizer shard whose mapping points past its
    partition (the model-state file's ``param_shapes`` is changed too)."""
    name = "zero_huge_declared"
    root, path = _copy_zero(zero_folder, work, name)
    _require_stage12(path, "craft_zero_huge_declared")
    model_file = _first_model_state_file(path)
    state = _load_real(model_file)
    param, group, bad = _single_fragment_param(path, state["param_shapes"])
    state["param_shapes"][group][param] = torch.Size([numel])
    torch.save(state, model_file)
    shard = _load_real(bad)
    mapping = shard[OPTIMIZER_STATE_DICT][PARAM_SLICE_MAPPINGS][group]
    mapping[param] = dataclasses.replace(mapping[param], numel=numel)
    torch.save(shard, bad)
    return _sealed(Crafted(name, root, path, bad, None, None))


# --- malformed ZeRO files: one value of the wrong type, range or dtype ----------------------------


def _first_param_name(mappings: dict) -> str:
    return next(iter(mappings))


def _set_group_value(key: str, value):
    def edit(state: dict) -> None:
        state[OPTIMIZER_STATE_DICT]["base_optimizer_state"]["param_groups"][0][key] = value
    return edit


# case -> (the file changed: "model" (mp rank 0's model states) or "optim" (mp rank 0's last DP shard), the change)
MALFORMED_ZERO = {
    # the fp32 master partition stored as bf16: a reader sizing its copy from the file reads half of it
    "bf16_partition": ("optim", lambda s: s[OPTIMIZER_STATE_DICT][FP32_PARTITIONS].__setitem__(
        0, s[OPTIMIZER_STATE_DICT][FP32_PARTITIONS][0].to(torch.bfloat16))),
    # containers of the optimizer state replaced by other types, or missing
    "optimizer_state_not_dict": ("optim", lambda s: s.__setitem__(OPTIMIZER_STATE_DICT, [1, 2])),
    "base_state_missing": ("optim", lambda s: s[OPTIMIZER_STATE_DICT].pop("base_optimizer_state")),
    "group_state_not_dict": ("optim", lambda s: s[OPTIMIZER_STATE_DICT]["base_optimizer_state"]["state"]
                             .__setitem__(0, ["exp_avg", "exp_avg_sq"])),
    "slice_mapping_not_address": ("optim", lambda s: s[OPTIMIZER_STATE_DICT][PARAM_SLICE_MAPPINGS][0].__setitem__(
        _first_param_name(s[OPTIMIZER_STATE_DICT][PARAM_SLICE_MAPPINGS][0]), 7)),
    # hyperparameters that load and then break the optimizer's step
    "lr_string": ("optim", _set_group_value("lr", "0.001")),
    "betas_number": ("optim", _set_group_value("betas", 0.9)),
    "eps_negative": ("optim", _set_group_value("eps", -1.0)),
    # model states
    "no_iteration": ("model", lambda s: s.pop("iteration")),
    "negative_topology": ("model", lambda s: s.__setitem__("checkpoint_parallel_dimensions",
                                                            {"tp_degree": -1, "pp_degree": -1})),
    "param_shapes_not_list": ("model", lambda s: s.__setitem__("param_shapes", {"a": 1})),
    "negative_dp_world_size": ("model", lambda s: s.__setitem__("dp_world_size", -2)),
    "negative_metadata_topology": ("model", lambda s: s[METADATA_KEY]["topology"].__setitem__("tp", -1)),
    "pattern_not_a_regex": ("model", lambda s: s["universal_checkpoint_info"].__setitem__(
        "pipeline_replicated_parameter_patterns", ["("])),
}


def craft_zero_malformed(zero_folder: str, work: str, case: str) -> Crafted:
    """A copy of a ZeRO-1/2 checkpoint with one value changed as ``MALFORMED_ZERO[case]`` says, in mp
    rank 0's model-state file or in its last DP rank's optimizer shard (``bad_file``)."""
    which, edit = MALFORMED_ZERO[case]
    name = f"zero_{case}"
    root, path = _copy_zero(zero_folder, work, name)
    _require_stage12(path, "craft_zero_malformed")
    bad = _first_model_state_file(path) if which == "model" else _optim_files(path, mp=0)[-1]
    state = _load_real(bad)
    edit(state)
    _remove_file(bad)  # never write through a hard link
    torch.save(state, bad)
    return _sealed(Crafted(name, root, path, bad, None, None))


def craft_zero_missing_model_states(zero_folder: str, work: str) -> Crafted:
    """``mp_rank_00_model_states.pt`` deleted: the optimizer shards are there, the file that says what
    they hold is not (``bad_file`` is the missing path)."""
    name = "zero_missing_model_states"
    root, path = _copy_zero(zero_folder, work, name)
    bad = _first_model_state_file(path)
    _remove_file(bad)
    return _sealed(Crafted(name, root, path, bad, None, None))


# --- universal cases ------------------------------------------------------------------------------


def craft_universal_payload_in_atom(universal_folder: str, work: str) -> Crafted:
    """The first parameter's ``fp32.pt`` atom (sorted by name) becomes ``dict(atom, extra=payload)``:
    atoms are the files a universal loader opens one by one, deep inside ``zero/``."""
    name = "universal_payload_atom"
    root, path = _copy_universal(universal_folder, work, name)
    zero = os.path.join(path, "zero")
    param = next(n for n in sorted(os.listdir(zero)) if os.path.isfile(os.path.join(zero, n, "fp32.pt")))
    bad = os.path.join(zero, param, "fp32.pt")
    marker = _marker(work, name)
    torch.save(dict(_load_real(bad), extra=payload(marker)), bad)
    return Crafted(name, root, path, bad, marker, None)


def craft_universal_payload_in_model_states(universal_folder: str, work: str) -> Crafted:
    """``mp_rank_00_model_states.pt`` gets a payload key; its twin ``zero_pp_rank_0_mp_rank_00_...``
    (a hard link in the converter's output) is unlinked and gets the same, so the ZeRO-1/2 and the
    ZeRO-3 loader paths both meet it."""
    name = "universal_payload_model_states"
    root, path = _copy_universal(universal_folder, work, name)
    bad = os.path.join(path, "mp_rank_00_model_states.pt")
    twin = os.path.join(path, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    marker = _marker(work, name)
    state = _load_real(bad)
    state[PAYLOAD_KEY] = payload(marker)
    for f in [bad] + ([twin] if os.path.lexists(twin) else []):
        _remove_file(f)  # unlink first: never write through a hard link into its twin
        torch.save(state, f)
    return Crafted(name, root, path, bad, marker, None)


def _first_atom(path: str, key: str = "fp32") -> str:
    zero = os.path.join(path, "zero")
    param = next(n for n in sorted(os.listdir(zero)) if os.path.isfile(os.path.join(zero, n, f"{key}.pt")))
    return os.path.join(zero, param, f"{key}.pt")


def _bf16_atom(state: dict) -> None:
    state["param"] = state["param"].to(torch.bfloat16)


def _lr_string(state: dict) -> None:
    state["param_groups"][0]["lr"] = "0.001"


# case -> (the file changed: "atom" (the first parameter's fp32.pt), "step" (its step.pt, replaced by what the
# change returns) or "optimizer_state" (zero/optimizer_state.pt), the change)
MALFORMED_UNIVERSAL = {
    "bf16_atom": ("atom", _bf16_atom),  # fp32 master weights stored as bf16
    "atom_without_param": ("atom", lambda state: state.pop("param")),  # the merge keys, no tensor
    "lr_string": ("optimizer_state", _lr_string),  # a hyperparameter that loads and breaks the step
    "step_string": ("step", lambda state: "2"),  # a step Adam's bias correction cannot use
}


def craft_universal_malformed(universal_folder: str, work: str, case: str) -> Crafted:
    """A copy of a universal folder with one value changed as ``MALFORMED_UNIVERSAL[case]`` says."""
    which, edit = MALFORMED_UNIVERSAL[case]
    name = f"universal_{case}"
    root, path = _copy_universal(universal_folder, work, name)
    bad = {"atom": lambda: _first_atom(path), "step": lambda: _first_atom(path, "step"),
           "optimizer_state": lambda: os.path.join(path, "zero", "optimizer_state.pt")}[which]()
    state = _load_real(bad)
    if which == "step":
        state = edit(state)
    else:
        edit(state)
    _remove_file(bad)
    torch.save(state, bad)
    return Crafted(name, root, path, bad, None, None)


# --- numpy values whose dtype hides an object field --------------------------------------------------


class _PickledAs:
    """Unpickles as ``func(*args)``, then a BUILD with ``state`` when given: any call numpy's own pickles make,
    with arguments and state of our choosing."""

    def __init__(self, func, args: tuple, state=None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def numpy_hidden_field_dtype(field: str = "O", flags: int = 63):
    """``float64``'s dtype as a pickle rebuilds it, with a BUILD state that adds one field of dtype ``field``
    (``"O"``: an object field, whose bytes numpy reads as object pointers) and the object flags; ``field=None``:
    only the flags. A plain ``float64`` pickles the state ``(3, '<', None, None, None, -1, -1, 0)``."""
    import numpy as np

    fields = None if field is None else {"a": (_PickledAs(np.dtype, (field, False, True)), 0)}
    names = None if field is None else ("a",)
    return _PickledAs(np.dtype, ("f8", False, True), (3, "|", None, names, fields, 8, 1, flags))


NUMPY_CASES = {  # how the hidden field reaches the file: a bare dtype, a scalar, an array
    "dtype_object_field": lambda np: numpy_hidden_field_dtype("O"),
    "dtype_float_field": lambda np: numpy_hidden_field_dtype("f8", flags=0),
    "dtype_object_flags": lambda np: numpy_hidden_field_dtype(None),
    "scalar_object_field": lambda np: _PickledAs(np._core.multiarray.scalar, (numpy_hidden_field_dtype("O"),
                                                                              b"\x41" * 8)),
    "array_object_field": lambda np: _PickledAs(np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                                                (1, (1,), numpy_hidden_field_dtype("O"), False, b"\x41" * 8)),
    "array_from_buffer": lambda np: _PickledAs(np.ndarray, ((1,), _PickledAs(np.dtype, ("f8", False, True)),
                                                            b"\x41" * 8)),
}


def craft_numpy_hidden_field(path: str, case: str) -> str:
    """``torch.save`` of a client-state-like dict (numpy scalars and an RNG-like array, as our model-state
    files hold) with one value built as ``NUMPY_CASES[case]`` says, at ``path``."""
    import numpy as np

    torch.save({"np_scalar": np.float64(1.5), "np_array": np.arange(4, dtype=np.uint32),
                "hidden": NUMPY_CASES[case](np)}, path)
    return path


# --- Hugging Face cases ---------------------------------------------------------------------------


def build_tiny_hf_gpt2(folder: str, seed: int = 1) -> str:
    """A tiny real GPT-2 saved by ``transformers`` (``save_pretrained``, safetensors): an HF input to
    craft from. Every tensor is perturbed so none is all zeros or ones."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval().save_pretrained(folder)
    return folder


def _hf_tensors(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder (safetensors or .bin, single or sharded), read safely."""
    from safetensors.torch import load_file

    def read(file: str) -> dict[str, torch.Tensor]:
        p = os.path.join(folder, file)
        return load_file(p) if file.endswith(".safetensors") else torch.load(p, map_location="cpu", weights_only=True)

    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.isfile(os.path.join(folder, index)):
            with open(os.path.join(folder, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            return {k: v for file in files for k, v in read(file).items()}
        if os.path.isfile(os.path.join(folder, single)):
            return read(single)
    raise ValueError(f"{folder}: no Hugging Face weights found")


def _copy_hf_side_files(src: str, dst: str, weights: bool = False) -> None:
    """Copy ``config.json`` and the other regular non-weight files (with the weights if asked)."""
    os.makedirs(dst, exist_ok=True)
    for n in sorted(os.listdir(src)):
        p = os.path.join(src, n)
        if os.path.isfile(p) and not os.path.islink(p) and (weights or not HF_WEIGHT_RE.search(n)):
            shutil.copy2(p, os.path.join(dst, n))


def craft_hf_bin_payload(hf_folder: str, work: str) -> Crafted:
    """``pytorch_model.bin`` (``torch.save`` of the real state dict plus a payload key) beside the real
    ``config.json``: the legacy format that is a pickle, still what many hubs serve."""
    name = "hf_bin_payload"
    root = _case_dir(work, name)
    _copy_hf_side_files(hf_folder, root)
    bad = os.path.join(root, "pytorch_model.bin")
    marker = _marker(work, name)
    state = dict(_hf_tensors(hf_folder))
    state[PAYLOAD_KEY] = payload(marker)
    torch.save(state, bad)
    return Crafted(name, root, root, bad, marker, None)


def craft_hf_index_traversal(hf_folder: str, work: str, absolute: bool) -> Crafted:
    """A sharded-safetensors folder whose ``model.safetensors.index.json`` sends half the tensors to
    ``../outside.safetensors`` (or to an absolute path): a real file outside the folder holding valid
    tensors, so only a check of the names (not of the contents) refuses it. ``escape`` is that outside
    file (a read, not a write: reading it is the leak); ``root`` = ``path`` = the HF folder."""
    from safetensors.torch import save_file

    name = f"hf_index_traversal_{'absolute' if absolute else 'relative'}"
    case = _case_dir(work, name)
    root = os.path.join(case, "hf")
    _copy_hf_side_files(hf_folder, root)
    tensors = {k: v.detach().clone().contiguous() for k, v in _hf_tensors(hf_folder).items()}
    names = sorted(tensors)
    inside, outside = names[: len(names) // 2], names[len(names) // 2:]
    shard = "model-00001-of-00002.safetensors"
    if absolute:
        escape = os.path.join(case, "elsewhere", "outside.safetensors")
        os.makedirs(os.path.dirname(escape))
        ref = escape
    else:
        escape, ref = os.path.join(case, "outside.safetensors"), "../outside.safetensors"
    save_file({k: tensors[k] for k in inside}, os.path.join(root, shard), metadata={"format": "pt"})
    save_file({k: tensors[k] for k in outside}, escape, metadata={"format": "pt"})
    bad = os.path.join(root, "model.safetensors.index.json")
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map = {**{k: shard for k in inside}, **{k: ref for k in outside}}
    with open(bad, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return Crafted(name, root, root, bad, None, escape)


def craft_hf_symlinked_extra(hf_folder: str, work: str) -> Crafted:
    """``tokenizer.json`` in an otherwise real HF folder is a symlink to a secret file outside it.
    Converters copy tokenizer files along (ours into ``hf_extras/``); following the link copies the
    secret into an output the attacker may get back. ``escape`` is the secret file."""
    name = "hf_symlinked_extra"
    case = _case_dir(work, name)
    root = os.path.join(case, "hf")
    _copy_hf_side_files(hf_folder, root, weights=True)
    _remove_file(os.path.join(root, "tokenizer.json"))
    secret = os.path.join(case, "secret.json")
    with open(secret, "w") as f:
        json.dump({"secret": f"untrusted-inputs secret of {secret}"}, f)
    bad = os.path.join(root, "tokenizer.json")
    os.symlink(secret, bad)
    return Crafted(name, root, root, bad, None, secret)


# --- crafting every case --------------------------------------------------------------------------


# --- rewriting a torch zip file -------------------------------------------------------------------

_ALIGN = 64  # torch.save aligns each record's data to 64 bytes; the rewrites keep that
_PADDING_ID = 0x7A70  # an extra-field id no reader interprets: padding only


def _padding(offset: int, name: str) -> bytes:
    """An extra field that puts the data of a record whose local header starts at ``offset`` on a
    64-byte boundary (30 bytes of fixed header, then the name, then this)."""
    pad = -(offset + 30 + len(name.encode())) % _ALIGN
    if pad < 4:  # an extra field needs its 4-byte header
        pad += _ALIGN
    return struct.pack("<HH", _PADDING_ID, pad - 4) + bytes(pad - 4)


def read_zip_records(path: str) -> tuple[str, list[tuple[str, bytes]]]:
    """(the archive folder, every record as (name relative to it, bytes) in physical order) of the torch
    zip ``path``. The bytes are taken from after each local header: torch's writer, and our converter's
    copy path, may leave a record's CRC unset, which ``zipfile``'s own reading would reject."""
    with zipfile.ZipFile(path) as zf:
        infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
    prefix = infos[0].filename.split("/", 1)[0]
    raw = open(path, "rb").read()
    records = []
    for i in infos:
        name_len, extra_len = struct.unpack_from("<HH", raw, i.header_offset + 26)
        start = i.header_offset + 30 + name_len + extra_len
        records.append((i.filename[len(prefix) + 1:], raw[start:start + i.compress_size]))
    return prefix, records


def write_zip_records(dst: str, prefix: str, records: list[tuple[str, bytes]], compress: Sequence[str] = (),
                      aligned: bool = True) -> None:
    """A zip at ``dst`` of ``records`` ((name relative to ``prefix``, bytes)) in this physical order, stored
    (``compress``: deflated) and, when ``aligned``, each record's data on a 64-byte boundary as torch writes
    it. Written beside ``dst`` and renamed over it."""
    tmp = dst + ".rewrite"
    with open(tmp, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as out:
        for name, data in records:
            info = zipfile.ZipInfo(f"{prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            if name in compress:
                info.compress_type = zipfile.ZIP_DEFLATED
            elif aligned:
                info.extra = _padding(f.tell(), info.filename)
            out.writestr(info, data)
    os.replace(tmp, dst)


def rewrite_torch_zip(src: str, dst: str, order: Callable[[list[str]], list[str]] | None = None,
                      replace: dict[str, bytes] | None = None, drop: Sequence[str] = (),
                      add: dict[str, bytes] | None = None, compress: Sequence[str] = ()) -> list[str]:
    """Write the records of the torch zip ``src`` into ``dst`` (which may be ``src``): in the physical
    order ``order`` gives (a permutation of the names, in their present order), with the bytes of
    ``replace``, without ``drop``, with ``add`` appended, ``compress`` deflated. Names are relative to
    the archive folder (``data.pkl``, ``data/0``). Returns the relative names in their new order."""
    prefix, present = read_zip_records(src)
    records = dict(present)
    records.update(replace or {})
    for name in drop:
        del records[name]
    records.update(add or {})
    names = list(records)
    if order is not None:
        names = order(names)
        if sorted(names) != sorted(records):
            raise ValueError("order must return a permutation of the record names")
    write_zip_records(dst, prefix, [(n, records[n]) for n in names], compress)
    return names


def reorder_zip_records(src: str, dst: str, order: Callable[[list[str]], list[str]] | None = None) -> list[str]:
    """``src`` with the same records (names and bytes) in another physical order, by default the tensor
    records (``data/*``) reversed, as any zip writer may lay them out: ``torch.load`` reads it as the
    original, a reader that assumes torch's own writer's layout does not."""
    def data_reversed(names: list[str]) -> list[str]:
        data = [n for n in names if n.startswith("data/")]
        flipped = iter(reversed(data))
        return [next(flipped) if n.startswith("data/") else n for n in names]

    return rewrite_torch_zip(src, dst, order or data_reversed)


def swap_records(a: str, b: str) -> Callable[[list[str]], list[str]]:
    """An ``order`` for ``rewrite_torch_zip``: records ``a`` and ``b`` trade places."""
    return lambda names: [b if n == a else a if n == b else n for n in names]


_CENTRAL_SIGNATURE = 0x02014B50
_DESCRIPTOR_SIGNATURE = 0x08074B50


def swap_records_in_place(path: str, a: str, b: str) -> None:
    """Records ``a`` and ``b`` (relative names, equal sizes and name lengths) trade places in ``path``,
    every other byte of the file unchanged: their local headers' names, their data and their data
    descriptors are swapped, and the directory points each name at its record's new place. ``torch.load``
    reads the file as before; a reader computing offsets from torch's own layout reads ``a``'s bytes
    where ``b``'s are and the reverse, and every other record right."""
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename.split("/", 1)[1]: i for i in zf.infolist()}
        start_dir = zf.start_dir
    ia, ib = infos[a], infos[b]
    if ia.file_size != ib.file_size or len(ia.filename) != len(ib.filename):
        raise ValueError(f"{path}: {a} and {b} differ in size or name length; they cannot swap in place")
    buf = bytearray(open(path, "rb").read())
    n = ia.file_size

    def data_at(info: zipfile.ZipInfo) -> int:
        name_len, extra_len = struct.unpack_from("<HH", buf, info.header_offset + 26)
        return info.header_offset + 30 + name_len + extra_len

    da, db = data_at(ia), data_at(ib)
    names = (ia.header_offset + 30, ib.header_offset + 30)
    buf[names[0]:names[0] + len(ia.filename)], buf[names[1]:names[1] + len(ib.filename)] = \
        ib.filename.encode(), ia.filename.encode()
    tail = 16 if struct.unpack_from("<I", buf, da + n)[0] == _DESCRIPTOR_SIGNATURE else 0
    buf[da:da + n + tail], buf[db:db + n + tail] = bytes(buf[db:db + n + tail]), bytes(buf[da:da + n + tail])
    pos = start_dir  # the central directory: each name now points at its record's new place
    while struct.unpack_from("<I", buf, pos)[0] == _CENTRAL_SIGNATURE:
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", buf, pos + 28)
        name = bytes(buf[pos + 46:pos + 46 + name_len]).decode()
        if name in (ia.filename, ib.filename):
            other = ib if name == ia.filename else ia
            struct.pack_into("<I", buf, pos + 42, other.header_offset)
        pos += 46 + name_len + extra_len + comment_len
    with open(path, "wb") as f:
        f.write(buf)


def craft_all(zero: str, universal: str, work: str, hf: str | None = None) -> list[tuple[str, Crafted]]:
    """Every case as (kind, Crafted); kind is "zero", "universal" or "hf" (which tools apply)."""
    cases = [("zero", craft_zero_payload_in_model_states(zero, work)),
             ("zero", craft_zero_payload_in_optimizer_shard(zero, work)),
             ("zero", craft_zero_traversal(zero, work, absolute=False)),
             ("zero", craft_zero_traversal(zero, work, absolute=True)),
             ("zero", craft_zero_fragment_past_partition(zero, work)),
             ("zero", craft_zero_huge_declared(zero, work)),
             ("universal", craft_universal_payload_in_atom(universal, work)),
             ("universal", craft_universal_payload_in_model_states(universal, work))]
    if hf:
        cases += [("hf", craft_hf_bin_payload(hf, work)),
                  ("hf", craft_hf_index_traversal(hf, work, absolute=False)),
                  ("hf", craft_hf_index_traversal(hf, work, absolute=True)),
                  ("hf", craft_hf_symlinked_extra(hf, work))]
    return cases


# --- running a tool on a case ---------------------------------------------------------------------


@dataclass
class RunResult:
    case: str
    tool: str
    argv: list[str]
    exit_code: int | None  # None when killed by a signal
    signal: str | None
    timed_out: bool
    marker_created: bool
    outside: list[str]  # paths written outside the output folder
    leaked: list[str]  # output files that are copies of the (pre-existing) escape file
    read_outside: bool  # exited 0 on a case whose input only works by reading ``escape``
    peak_rss_mb: float
    wall_s: float
    message: str  # the error line, or "" on success
    notes: list[str] = field(default_factory=list)

    def outcome(self) -> str:
        """One short phrase, most serious finding first."""
        found = []
        if self.marker_created:
            found.append("ran payload (marker created)")
        if self.outside:
            found.append("wrote outside output: " + ", ".join(self.outside[:2]))
        if self.leaked:
            found.append("copied outside file into output: " + ", ".join(self.leaked[:2]))
        if self.read_outside:
            found.append("read a file outside the input folder")
        if self.timed_out:
            found.append("timed out (killed)")
        elif self.signal:
            found.append(f"killed by {self.signal}")
        elif self.exit_code == 0:
            found.append("accepted")
        elif self.message.startswith("(traceback)"):
            found.append(f"error {self.message}")  # a crash, not a deliberate refusal
        else:
            found.append(f"refused: {self.message}")
        status = f"exit {self.exit_code}" if self.exit_code is not None else (self.signal or "killed")
        return f"{status}, {'; '.join(found)}"


_NOISE = re.compile(r"^\[\d{4}-\d\d-\d\d [^\]]*\] \[(INFO|WARNING|DEBUG)\]|^\s*\d+%\||it/s\]|s/it\]")


def _message(stderr: str) -> str:
    """The line that says why: an ``error:`` line, else the last line of a traceback, else the first
    line that is not DeepSpeed log noise or a progress bar."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", stderr) if ln.strip() and not _NOISE.search(ln)]
    for ln in lines:
        if ln.startswith("error:"):
            return ln
    if any(ln.startswith("Traceback") for ln in lines):
        return f"(traceback): {lines[-1]}"
    return lines[0] if lines else ""


# Runs each tool: a bare interpreter (-S, stdlib only, ~10 MB) that sets the limits, runs the tool and
# writes the tool's exit status and rusage (from wait4) to a JSON file. Measuring from a small
# launcher matters: a child forked straight from this process (torch imported, ~150 MB) has that
# RSS counted in its ru_maxrss, since Linux records the pre-exec memory's high-water mark.
_LAUNCHER = """
import json, os, resource, subprocess, sys
report, limit_as, limit_fsize, argv = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))
proc = subprocess.Popen(argv)  # restore_signals: the tool gets SIGXFSZ back (Python ignores it)
_, status, usage = os.wait4(proc.pid, 0)
with open(report, "w") as f:
    json.dump({"exit": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}, f)
"""


def run_measured(argv: list[str], log_prefix: str, timeout: float) -> tuple[int | None, str | None, bool, float,
                                                                              float, str]:
    """Run ``argv`` (cwd=repo, DS_ACCELERATOR=cpu) through ``_LAUNCHER`` with a timeout; stdout/stderr
    go to ``log_prefix`` files. Returns (exit code, signal name, timed out, peak RSS MB, wall seconds,
    stderr text). Peak RSS is the tool's ``ru_maxrss``: its largest process, workers included. On
    timeout the tool's whole session is killed and RSS is unknown (nan)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    report = log_prefix + ".rusage.json"
    _remove_file(report)
    launcher = [sys.executable, "-S", "-c", _LAUNCHER, report, str(CHILD_ADDRESS_SPACE), str(CHILD_FILE_SIZE)]
    timed_out = False
    with open(log_prefix + ".out", "wb") as out, open(log_prefix + ".err", "wb") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(launcher + list(argv), cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        wall = time.monotonic() - t0
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # on timeout, and any worker the tool left behind
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    code, rss = None, float("nan")
    if os.path.isfile(report):
        with open(report) as f:
            measured = json.load(f)
        code, rss = measured["exit"], measured["maxrss_kb"] / 1024
    sig = signal.Signals(-code).name if code is not None and code < 0 else ("SIGKILL" if code is None else None)
    with open(log_prefix + ".err", errors="replace") as f:
        stderr = f.read()
    return (None if sig else code), sig, timed_out, rss, wall, stderr


def _snapshot(folder: str) -> dict[str, tuple[int, int]]:
    """Every entry under ``folder`` (not following links): relative path -> (size, mtime_ns)."""
    out = {}
    if not os.path.isdir(folder):
        return out
    for d, dirs, files in os.walk(folder):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            out[os.path.relpath(p, folder)] = (st.st_size if not os.path.isdir(p) else 0, st.st_mtime_ns)
    return out


def _is_under(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _copies_of(secret: str, folder: str) -> list[str]:
    """Files under ``folder`` whose bytes are exactly those of ``secret``."""
    if not os.path.isfile(secret) or not os.path.isdir(folder):
        return []
    with open(secret, "rb") as f:
        wanted = f.read()
    hits = []
    for d, _, files in os.walk(folder):
        for n in files:
            p = os.path.join(d, n)
            if os.path.isfile(p) and os.path.getsize(p) == len(wanted):
                with open(p, "rb") as f:
                    if f.read() == wanted:
                        hits.append(os.path.relpath(p, folder))
    return hits


@dataclass
class ToolRun:
    tool: str
    argv: list[str]
    output: str | None  # the output folder the tool is told to create (None: the tool writes nothing)


def tool_runs(kind: str, case: Crafted, out_parent: str) -> tuple[list[ToolRun], ToolRun | None]:
    """(our tools, DeepSpeed's converter or None) for one case; outputs go under ``out_parent``."""
    py = sys.executable
    step_out = os.path.join(out_parent, os.path.basename(case.path) + "_universal")
    if kind == "zero":
        ours = [ToolRun("ds_to_universal", [py, "tools/ds_to_universal.py", "--input_folder", case.path,
                                            "--output_folder", step_out], step_out),
                ToolRun("inspect_checkpoint", [py, "tools/inspect_checkpoint.py", case.path], None)]
        theirs = ToolRun("deepspeed ds_to_universal", [py, "-m", "deepspeed.checkpoint.ds_to_universal",
                                                       "--input_folder", case.path, "--output_folder", step_out],
                         step_out)
        return ours, theirs
    if kind == "universal":
        hf_out = os.path.join(out_parent, "hf")
        return [ToolRun("universal_to_hf", [py, "tools/universal_to_hf.py", "--input_folder", case.path,
                                            "--output_dir", hf_out], hf_out),
                ToolRun("inspect_checkpoint", [py, "tools/inspect_checkpoint.py", case.path], None)], None
    save = os.path.join(out_parent, "hf_universal")
    return [ToolRun("hf_to_universal", [py, "tools/hf_to_universal.py", "--hf_checkpoint_dir", case.path,
                                        "--save_dir", save], save)], None


def _stat(path: str | None) -> tuple[int, int] | None:
    if not path or not os.path.lexists(path):
        return None
    st = os.lstat(path)
    return st.st_size, st.st_mtime_ns


def _count_files(path: str) -> int:
    if not os.path.isdir(path):
        return 1
    return sum(len(files) for _, _, files in os.walk(path))


def _delete(path: str) -> None:
    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


@dataclass
class _Before:
    """What a run may change, recorded before it starts."""

    escape: tuple[int, int] | None  # the escape path's (size, mtime) if it exists (an input file)
    work_entries: set[str]
    case_tree: dict[str, tuple[int, int]]


def _writes_outside(case: Crafted, run: ToolRun, work: str, out_parent: str, before: _Before) -> tuple[list[str],
                                                                                                      list[str]]:
    """(paths written outside the output folder, notes): a new or changed ``escape``, unexpected
    entries beside the output, new entries in ``work``, changed files in the case's input folder."""
    found, notes = [], []

    def add(path: str, what: str = "") -> None:
        if not any(_is_under(path, f) or _is_under(f, path) for f, _ in found):  # one finding per tree
            found.append((path, what))

    after = _stat(case.escape)
    if case.escape and before.escape is None and after is not None:
        add(case.escape, f"{_count_files(case.escape)} files")
    elif before.escape is not None and after != before.escape:
        add(case.escape, "modified")
    expected = {os.path.basename(run.output), LATEST_UNIVERSAL} if run.output else set()
    for n in sorted(os.listdir(out_parent)):
        if run.output and n.startswith(os.path.basename(run.output) + ".tmp"):
            notes.append(f"left staging folder {n}")
        elif n not in expected:
            add(os.path.join(out_parent, n), f"{_count_files(os.path.join(out_parent, n))} files")
    known = {os.path.basename(out_parent), "_logs", os.path.basename(case.marker or "")}
    for n in sorted(set(os.listdir(work)) - before.work_entries - known):
        add(os.path.join(work, n), f"{_count_files(os.path.join(work, n))} files")
    case_dir = os.path.join(work, case.name)
    case_after = _snapshot(case_dir)
    for k in sorted(k for k in case_after if before.case_tree.get(k) != case_after[k])[:3]:
        add(os.path.join(case_dir, k), "in the input")
    return [f"{p} ({what})" if what else p for p, what in found], notes


def run_case_tool(case: Crafted, run: ToolRun, work: str, out_parent: str, timeout: float) -> RunResult:
    """Run one tool on one case from a clean state, record what it did beyond its exit code, and
    remove what it left (its output, the marker, what it wrote into ``work``) for the next run."""
    work = os.path.abspath(work)
    if os.path.lexists(out_parent):
        shutil.rmtree(out_parent)
    os.makedirs(out_parent)
    if case.marker:
        _remove_file(case.marker)
    before = _Before(_stat(case.escape), set(os.listdir(work)), _snapshot(os.path.join(work, case.name)))
    logs = os.path.join(work, "_logs")
    os.makedirs(logs, exist_ok=True)
    prefix = os.path.join(logs, f"{case.name}__{run.tool.replace(' ', '_')}")
    code, sig, timed_out, rss, wall, stderr = run_measured(run.argv, prefix, timeout)

    marker_created = bool(case.marker and os.path.exists(case.marker))
    outside, notes = _writes_outside(case, run, work, out_parent, before)
    leaked = _copies_of(case.escape, run.output) if before.escape is not None and run.output else []
    # the index traversal cases only convert if the tensors outside the folder were read
    read_outside = case.name.startswith("hf_index_traversal") and code == 0

    if case.marker:
        _remove_file(case.marker)
    if case.escape and before.escape is None and os.path.lexists(case.escape) and _is_under(case.escape, work):
        _delete(case.escape)
    for n in set(os.listdir(work)) - before.work_entries - {os.path.basename(out_parent), "_logs"}:
        _delete(os.path.join(work, n))  # new entries of this run, inside our own work folder
    return RunResult(case.name, run.tool, run.argv, code, sig, timed_out, marker_created, outside, leaked,
                     read_outside, rss, wall, _message(stderr) if code != 0 else "", notes)


# --- report ---------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _short(text: str, work: str, limit: int = 160) -> str:
    """``text`` with ``work`` written as ``$WORK``, cut to ``limit`` characters."""
    text = text.replace(work.rstrip("/") + "/", "$WORK/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summary_table(rows: list[tuple[Crafted, list[RunResult], RunResult | None]], work: str) -> str:
    lines = ["| bad input | our tool: exit / outcome | DeepSpeed ds_to_universal: exit / outcome |",
             "|---|---|---|"]
    for case, ours, theirs in rows:
        our_cell = "<br>".join(f"**{r.tool}**: {_short(r.outcome(), work)}" for r in ours)
        their_cell = _short(theirs.outcome(), work) if theirs else "n/a"
        lines.append(f"| {case.name} | {_cell(our_cell)} | {_cell(their_cell)} |")
    return "\n".join(lines)


def detail_table(results: list[RunResult], work: str) -> str:
    lines = ["| bad input | tool | exit | payload ran | written outside output | peak RSS MB | wall s | message |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        exit_text = str(r.exit_code) if r.exit_code is not None else (r.signal or "killed")
        if r.timed_out:
            exit_text += " (timeout)"
        outside = ", ".join(r.outside + [f"copied into output: {x}" for x in r.leaked]) or "no"
        msg = "; ".join([r.message] + r.notes) if r.notes else r.message
        lines.append(f"| {r.case} | {r.tool} | {exit_text} | {'yes' if r.marker_created else 'no'} | "
                     f"{_cell(_short(outside, work))} | {r.peak_rss_mb:.0f} | {r.wall_s:.1f} | "
                     f"{_cell(_short(msg, work, 200))} |")
    return "\n".join(lines)


def negative_controls(cases: list[Crafted]) -> list[str]:
    """``payload_is_live`` for every payload case: the payload must run under a plain unpickling.

    Unpickling an optimizer shard imports DeepSpeed, whose logger binds to ``sys.stdout`` at import:
    stdout is pointed at stderr meanwhile so its log lines stay out of the printed table."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with contextlib.redirect_stdout(sys.stderr):
        return [f"- {c.name}: payload_is_live({os.path.relpath(c.bad_file, c.root)}) = "
                f"{payload_is_live(c.bad_file, c.marker)}" for c in cases if c.marker]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zero", required=True, help="a real ZeRO-1/2 checkpoint folder, e.g. <save>/global_step2")
    p.add_argument("--universal", required=True, help="a real universal checkpoint folder (holding zero/)")
    p.add_argument("--hf", default=None, help="a real Hugging Face folder (config.json + weights); HF cases need it")
    p.add_argument("--work", required=True, help="where the cases, outputs and logs go")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per tool run (default 300)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    # Rewriting optimizer shards imports DeepSpeed, whose logger writes to the sys.stdout of its
    # import time: point that at stderr so stdout is just the report.
    with contextlib.redirect_stdout(sys.stderr):
        cases = craft_all(args.zero, args.universal, work, args.hf)
        rows, results = [], []
        for kind, case in cases:
            out_parent = os.path.join(work, f"{case.name}_out")
            ours, theirs = tool_runs(kind, case, out_parent)
            done = []
            for run in ours + ([theirs] if theirs else []):
                print(f"running {run.tool} on {case.name} ...", flush=True)
                done.append(run_case_tool(case, run, work, out_parent, args.timeout))
            results += done
            rows.append((case, done[: len(ours)], done[len(ours)] if theirs else None))
        controls = negative_controls([c for _, c in cases])
    print(f"$WORK = {work}\n")
    print(summary_table(rows, work))
    print()
    print(detail_table(results, work))
    print()
    print("Negative controls (a plain torch.load(weights_only=False) of the bad file runs the payload):")
    print("\n".join(controls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
