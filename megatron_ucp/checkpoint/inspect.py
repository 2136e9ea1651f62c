"""Describe ZeRO and universal checkpoints, and compare two universal checkpoints tensor by tensor."""

from __future__ import annotations

import dataclasses
import filecmp
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_ucp.checkpoint.atoms import atom_extras, atom_tensor
from megatron_ucp.checkpoint.format import (
    ATOM_KEYS,
    MODEL_STATES_RE,
    OPTIMIZER_STATE_FILE,
    STATE_KEYS,
    STEP_KEY,
    ZERO3_MODEL_STATES_RE,
    ZERO_DIR,
    atom_file,
    atom_path,
    check_model_states,
    check_state_atom,
    describe_tokenizer,
    metadata_from_state,
    model_states_name,
    zero_dir,
)
from megatron_ucp.checkpoint.publish import COMPLETE_MARKER, check_manifest, read_marker
from megatron_ucp.checkpoint.trust import check_name
from megatron_ucp.checkpoint.zero import OPTIMIZER_STATE_DICT, CheckpointError, load_file, open_zero_checkpoint
from megatron_ucp.layout.slicing import bitwise_equal


def deep_equal(a, b) -> bool:
    """Exact equality of nested checkpoint objects: tensors by dtype, shape and bits (``bitwise_equal``)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and bitwise_equal(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    if type(a) is not type(b):
        return False
    if type(a).__eq__ is object.__eq__ and hasattr(a, "__dict__"):  # e.g. DeepSpeed's LossScaler
        return deep_equal(vars(a), vars(b))
    return bool(a == b)


def _files(root: str) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root) for n in names]
    return sorted(out)


@dataclass
class Comparison:
    a: str
    b: str
    compared: int = 0
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)
    # our stage-compatibility additions (``checkpoint.universal``), present in one folder only and
    # checked to be exactly what they are derived from; they do not count as differences
    compat_extras: list[str] = field(default_factory=list)
    # our completion markers: each checked against its own folder's files, not compared (they record
    # when and from what request they were written)
    markers: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not (self.only_in_a or self.only_in_b or self.different)

    def summary(self) -> str:
        verdict = "identical" if self.equal else "DIFFERENT"
        lines = [f"{verdict}: {self.compared} files compared between {self.a} and {self.b}"]
        for label, items in (("only in first", self.only_in_a), ("only in second", self.only_in_b),
                             ("different", self.different)):
            if items:
                lines.append(f"  {label} ({len(items)}): " + ", ".join(items[:10]) + (" ..." if len(items) > 10 else ""))
        if self.markers:
            lines.append(f"  completion markers, checked against their folders: {', '.join(self.markers)}")
        if self.compat_extras:
            lines.append(f"  stage-compatibility additions, verified ({len(self.compat_extras)}): "
                         + ", ".join(self.compat_extras[:4]) + (" ..." if len(self.compat_extras) > 4 else ""))
        return "\n".join(lines)


ZERO = ZERO_DIR + os.sep  # the atoms' folder, in relative paths (model-state names may start with "zero" too)
OPTIMIZER_STATE_REL = os.path.join(ZERO_DIR, OPTIMIZER_STATE_FILE)


def _zero3_alias_of(name: str) -> str | None:
    """The ZeRO-1/2 model-state name a DP-rank-0 ZeRO-3 model-state name stands beside, if it is one."""
    m = ZERO3_MODEL_STATES_RE.match(name)
    return model_states_name(int(m.group(2))) if m and int(m.group(1)) == 0 else None


def _compat_aliases(root: str, files: list[str]) -> list[str]:
    """ZeRO-3-name aliases that are byte-identical to their ``mp_rank_XX`` file."""
    aliases = []
    for rel in files:
        target = _zero3_alias_of(rel)
        if target and target in files and filecmp.cmp(os.path.join(root, rel), os.path.join(root, target),
                                                       shallow=False):
            aliases.append(rel)
    return aliases


def _without_stage3_keys(sd: dict) -> tuple[dict, bool]:
    """``optimizer_state.pt`` minus our ZeRO-3 entry when it is exactly the derived one."""
    inner = sd.get(OPTIMIZER_STATE_DICT)
    if (isinstance(inner, dict) and set(inner) == {"state", "param_groups"} and list(inner["state"]) == [0]
            and list(inner["state"][0]) == ["step"] and deep_equal(inner["param_groups"], sd.get("param_groups"))):
        return {k: v for k, v in sd.items() if k != OPTIMIZER_STATE_DICT}, True
    return sd, False


def _param_values(obj):
    return atom_tensor(obj).reshape(-1) if obj is not None else None


def compare_universal(a: str, b: str, include_model_states: bool = True, values_only: bool = False) -> Comparison:
    """Every file under two universal folders: ``zero/**.pt`` by content, ``mp_rank_*`` by bytes.

    Our stage-compatibility additions present in only one folder (ZeRO-3-name aliases of the model
    states, the ZeRO-3 entry of ``optimizer_state.pt``) are verified and listed apart, and so is our
    completion marker (its manifest checked against its folder; it records when it was written). ``values_only``
    compares only the atoms' values, flattened (DeepSpeed writes ZeRO-3 atoms as raw flat tensors,
    we write dicts in the logical shape), and skips the other files.
    """
    for root in (a, b):
        if not os.path.isdir(zero_dir(root)):
            raise CheckpointError(f"{root}: not a universal checkpoint (no zero/ folder)")
    fa, fb = _files(a), _files(b)
    markers = []
    for root, files in ((a, fa), (b, fb)):  # our completion marker: checked against its folder, not compared
        if COMPLETE_MARKER in files:
            marker = read_marker(root)
            assert marker is not None  # _files listed it, so read_marker finds it
            check_manifest(root, marker)
            files.remove(COMPLETE_MARKER)
            markers.append(os.path.join(os.path.basename(root), COMPLETE_MARKER))
    if values_only:
        fa, fb = ([f for f in files if f.startswith(ZERO) and f != OPTIMIZER_STATE_REL] for files in (fa, fb))
    elif not include_model_states:
        fa, fb = ([f for f in files if f.startswith(ZERO)] for files in (fa, fb))
    extras_a = [x for x in _compat_aliases(a, fa) if x not in fb]
    extras_b = [x for x in _compat_aliases(b, fb) if x not in fa]
    fa = [f for f in fa if f not in extras_a]
    fb = [f for f in fb if f not in extras_b]
    extras = extras_a + extras_b
    if values_only:  # step.pt exists only where the writer made ZeRO-1/2-style atoms
        step = os.sep + atom_file(STEP_KEY)
        fa = [f for f in fa if not f.endswith(step)]
        fb = [f for f in fb if not f.endswith(step)]
    cmp = Comparison(a, b, only_in_a=sorted(set(fa) - set(fb)), only_in_b=sorted(set(fb) - set(fa)),
                     compat_extras=sorted(extras), markers=markers)
    for rel in sorted(set(fa) & set(fb)):
        pa, pb = os.path.join(a, rel), os.path.join(b, rel)
        cmp.compared += 1
        if values_only:
            va, vb = _param_values(load_file(pa, mmap=True)), _param_values(load_file(pb, mmap=True))
            same = bitwise_equal(va, vb)
        elif rel.startswith(ZERO):
            xa, xb = load_file(pa, mmap=True), load_file(pb, mmap=True)
            if rel == OPTIMIZER_STATE_REL and isinstance(xa, dict) and isinstance(xb, dict):
                if (OPTIMIZER_STATE_DICT in xa) != (OPTIMIZER_STATE_DICT in xb):  # only one has our ZeRO-3 entry
                    (xa, stripped_a), (xb, stripped_b) = _without_stage3_keys(xa), _without_stage3_keys(xb)
                    cmp.compat_extras += [f"{rel}[{OPTIMIZER_STATE_DICT}]"] if stripped_a or stripped_b else []
            same = deep_equal(xa, xb)
        else:
            same = filecmp.cmp(pa, pb, shallow=False)
        if not same:
            cmp.different.append(rel)
    return cmp


def describe_universal(folder: str) -> list[str]:
    zero = zero_dir(folder)
    if not os.path.isdir(zero):
        raise CheckpointError(f"{folder}: not a universal checkpoint (no {ZERO_DIR}/ folder)")
    lines = [f"universal checkpoint {folder}"]
    names = os.listdir(folder)
    mp = (sorted(f for f in names if MODEL_STATES_RE.match(f))  # ZeRO-1/2 names, else ZeRO-3's
          or sorted(f for f in names if _zero3_alias_of(f)))
    if mp:
        path = os.path.join(folder, mp[0])
        st = check_model_states(load_file(path, mmap=True), path)
        meta = metadata_from_state(st, path)
        topology = meta.topology.to_dict() if meta is not None and meta.topology is not None else None
        lines.append(f"  iteration {st.get('iteration', st.get('global_steps'))}, source topology "
                     f"{topology}, {len(mp)} model-state files")
        if meta is not None and meta.hf_source is not None and meta.hf_source.tokenizer is not None:
            lines.append(f"  imported with tokenizer {describe_tokenizer(meta.hf_source.tokenizer)}")
    for name in sorted(n for n in os.listdir(zero) if os.path.isdir(os.path.join(zero, n))):
        path = atom_path(folder, check_name(name, zero), STATE_KEYS[0])
        atom = load_file(path, mmap=True)
        t = check_state_atom(atom, path)
        extra = atom_extras(atom)
        states = [k for k in ATOM_KEYS if os.path.exists(atom_path(folder, name, k))]
        lines.append(f"  {name:60s} {str(tuple(t.shape)):18s} {str(t.dtype):14s} {','.join(states)} {extra or ''}")
    return lines


def describe_zero(folder: str) -> list[str]:
    ckpt = open_zero_checkpoint(folder)
    meta = ckpt.checkpoint_metadata
    lines = [f"ZeRO-{ckpt.zero_stage} checkpoint {ckpt.folder}",
             f"  iteration {ckpt.iteration}, TP {ckpt.tp} PP {ckpt.pp} DP {ckpt.dp}, "
             f"{'bf16' if ckpt.bf16_prefix else 'fp16/fp32'} optimizer files, dtype {meta.dtype if meta else '?'}"]
    if meta:
        parts = list(meta.pipeline_parts) if meta.pipeline_parts is not None else None
        versions = {k: v for k, v in dataclasses.asdict(meta.versions).items() if v is not None}
        lines.append(f"  vocab {meta.original_vocab_size} (padded {meta.padded_vocab_size}), "
                     f"pipeline parts {parts}, versions {versions}")
    for name, src in ckpt.param_sources.items():
        lines.append(f"  {name:60s} stage {src.pp} group {src.group} local {src.local_shapes[0]} x TP{ckpt.tp}")
    return lines
