"""Describe ZeRO and universal checkpoints, and compare two universal checkpoints tensor by tensor."""

from __future__ import annotations

import filecmp
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_ucp.checkpoint.zero import STATE_KEYS, CheckpointError, load_file, open_zero_checkpoint


def deep_equal(a, b) -> bool:
    """Exact equality of nested checkpoint objects: tensors by dtype, shape and value (torch.equal)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a, b))
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
        return "\n".join(lines)


def compare_universal(a: str, b: str, include_model_states: bool = True) -> Comparison:
    """Every file under two universal folders: ``zero/**.pt`` by content, ``mp_rank_*`` by bytes."""
    for root in (a, b):
        if not os.path.isdir(os.path.join(root, "zero")):
            raise CheckpointError(f"{root}: not a universal checkpoint (no zero/ folder)")
    fa, fb = _files(a), _files(b)
    if not include_model_states:
        fa = [f for f in fa if f.startswith("zero")]
        fb = [f for f in fb if f.startswith("zero")]
    cmp = Comparison(a, b, only_in_a=sorted(set(fa) - set(fb)), only_in_b=sorted(set(fb) - set(fa)))
    for rel in sorted(set(fa) & set(fb)):
        pa, pb = os.path.join(a, rel), os.path.join(b, rel)
        cmp.compared += 1
        if rel.startswith("zero"):
            same = deep_equal(load_file(pa, mmap=True), load_file(pb, mmap=True))
        else:
            same = filecmp.cmp(pa, pb, shallow=False)
        if not same:
            cmp.different.append(rel)
    return cmp


def describe_universal(folder: str) -> list[str]:
    zero = os.path.join(folder, "zero")
    if not os.path.isdir(zero):
        raise CheckpointError(f"{folder}: not a universal checkpoint (no zero/ folder)")
    lines = [f"universal checkpoint {folder}"]
    mp = sorted(f for f in os.listdir(folder) if f.startswith("mp_rank_"))
    if mp:
        st = load_file(os.path.join(folder, mp[0]), mmap=True)
        meta = st.get("megatron_ucp") or {}
        lines.append(f"  iteration {st.get('iteration', st.get('global_steps'))}, source topology "
                     f"{meta.get('topology')}, {len(mp)} model-state files")
    for name in sorted(n for n in os.listdir(zero) if os.path.isdir(os.path.join(zero, n))):
        atom = load_file(os.path.join(zero, name, "fp32.pt"), mmap=True)
        extra = {k: v for k, v in atom.items() if k != "param"} if isinstance(atom, dict) else {}
        t = atom["param"] if isinstance(atom, dict) else atom
        states = [k for k in STATE_KEYS + ("step",) if os.path.exists(os.path.join(zero, name, f"{k}.pt"))]
        lines.append(f"  {name:60s} {str(tuple(t.shape)):18s} {str(t.dtype):14s} {','.join(states)} {extra or ''}")
    return lines


def describe_zero(folder: str) -> list[str]:
    ckpt = open_zero_checkpoint(folder)
    meta = ckpt.metadata or {}
    lines = [f"ZeRO-{ckpt.zero_stage} checkpoint {ckpt.folder}",
             f"  iteration {ckpt.iteration}, TP {ckpt.tp} PP {ckpt.pp} DP {ckpt.dp}, "
             f"{'bf16' if ckpt.bf16_prefix else 'fp16/fp32'} optimizer files, dtype {meta.get('dtype', '?')}"]
    if meta:
        lines.append(f"  vocab {meta['original_vocab_size']} (padded {meta['padded_vocab_size']}), "
                     f"pipeline parts {meta['pipeline_parts']}, versions {meta['versions']}")
    for name, src in ckpt.param_sources.items():
        lines.append(f"  {name:60s} stage {src.pp} group {src.group} local {src.local_shapes[0]} x TP{ckpt.tp}")
    return lines
