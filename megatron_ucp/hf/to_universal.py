"""Hugging Face checkpoint -> universal checkpoint our trainer (and stock DeepSpeed) loads at any TP/PP.

Per parameter of our table (``layout/hf.py`` says which HF tensors make it and how), the HF tensors
are read one at a time, joined into our full unpadded layout, and written as DeepSpeed's universal
atoms: ``fp32.pt`` with the weights, ``exp_avg.pt`` / ``exp_avg_sq.pt`` of zeros and ``step.pt`` = 0,
with the same per-kind keys our ZeRO converter writes. The zero atoms are the cached serialised
bytes around a file hole, so they cost neither memory nor write time.

A mixture-of-experts checkpoint may store its experts one tensor per expert (the Hub's files, and what
transformers 5's ``save_pretrained`` writes) or fused, one [E, ...] tensor per layer and projection
(transformers 5's modules); the names it holds say which (``layout.hf.expert_layout_of``). A fused
tensor is never read whole: each expert's atom reads only its slice (``HFCheckpoint.read_slice``).

The result starts a run from step 0 with fresh moments; ``--finetune`` (or a new run's flags) sets
the schedule and hyperparameters. Output goes to a temporary sibling folder, is verified there (every
weight atom re-read against the source; a ``.bin`` source's bytes, as our reader located them,
sampled against ``torch.load``'s: ``checkpoint.crosscheck``) and marked complete, then renamed into place, and
``latest_universal`` is written last (``checkpoint/publish.py``). Tokenizer files are copied only
when they are regular files inside the source folder (or the HF cache's blobs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from megatron_ucp.checkpoint.atoms import atom_keys, atom_tensor, make_atom, save, write_atom, write_zero_atom
from megatron_ucp.checkpoint.crosscheck import crosscheck_files
from megatron_ucp.checkpoint.format import (  # noqa: F401 - HF_EXTRAS_DIR: re-exported
    HF_EXTRAS_DIR,
    SOURCE_HUGGINGFACE,
    SOURCE_NOTE_FILE,
    STATE_KEYS,
    STEP_KEY,
    CheckpointMetadata,
    HFSource,
    Versions,
    atom_dir,
    atom_path,
    client_state,
    zero_dir,
)
from megatron_ucp.checkpoint.publish import (
    UNIVERSAL_KIND,
    check_output_path,
    check_replaceable,
    fingerprint,
    finished_output,
    is_universal_folder,
    remove_stale_temporaries,
    staged_folder,
    write_latest_universal,
    write_marker,
)
from megatron_ucp.checkpoint.trust import regular_file_inside
from megatron_ucp.checkpoint.zero import CheckpointError, FlatRef, load_file, stored_equals
from megatron_ucp.config import ModelConfig
from megatron_ucp.hf.ds_files import write_loader_files
from megatron_ucp.hf.reader import HFCheckpoint, open_hf_checkpoint, read_config
from megatron_ucp.hf.transforms import hf_shapes, to_ours
from megatron_ucp.families import Family, family_of_model, model_config_from_hf
from megatron_ucp.layout.hf import (
    Combine,
    HFMapping,
    UnsupportedConfig,
    check_declared_sizes,
    expert_layout_of,
    hf_mappings,
    is_ignored,
    source_dtype,
)
from megatron_ucp.layout.slicing import padded_vocab_size

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")


def tokenizer_identity(folder: str) -> dict | None:
    """The tokenizer record an import keeps (``format.HFSource.tokenizer``) of the tokenizer files copied into
    ``folder`` (its ``hf_extras``): ``HFTokenizer``'s identity of them, so a dataset preprocessed with the
    source folder's tokenizer carries the same sha256, and its vocabulary size when ``transformers`` can load
    it (null otherwise: an import does not need a working tokenizer). None when no tokenizer file was copied."""
    from megatron_ucp.data.tokenizer import HFTokenizer, files_sha256, hf_tokenizer_files

    present = hf_tokenizer_files(folder)
    if not present:
        return None
    try:
        tok = HFTokenizer(folder)
    except ValueError:  # not loadable, or no EOS: the files' hash still identifies them
        return {"type": HFTokenizer.name, "sha256": files_sha256(present), "vocab_size": None}
    return {**tok.identity, "vocab_size": int(tok.vocab_size)}


@dataclass
class HFImportReport:
    output_folder: str
    family: str
    params: int
    hf_tensors: int
    source_format: str
    seconds: float
    kept: bool = False  # a finished, verified import of the same source was already there

    def summary(self) -> str:
        if self.kept:
            return f"{self.output_folder}: already imported from this source and verified: kept as it is"
        return (f"converted {self.hf_tensors} {self.source_format} tensors of a {self.family} into {self.params} "
                f"universal parameters at {self.output_folder} in {self.seconds:.2f} s")


def check_coverage(ckpt: HFCheckpoint, mappings: list[HFMapping], cfg: ModelConfig, family: Family,
                   dropped: frozenset[str] = frozenset()) -> None:
    """Every HF tensor we need is present with the shape the config implies; nothing else is left over
    (but the ``dropped`` names: a negative control's)."""
    available = set(ckpt.names())
    needed = {n for m in mappings for n in m.hf_names}
    missing = sorted(needed - available)
    if missing:
        raise CheckpointError(f"{ckpt.folder}: {len(missing)} tensors a {family.architecture} of this config needs "
                              f"are missing, e.g. {missing[:3]}")
    extra = sorted(n for n in available - needed
                   if not is_ignored(n, cfg, family) and n not in dropped)
    if extra:
        raise CheckpointError(f"{ckpt.file_of(extra[0])}: {len(extra)} tensors map to nothing of ours "
                              f"(e.g. {extra[:3]}); is config.json the model's own?")
    for m in mappings:
        for name, shape in zip(m.hf_names, hf_shapes(m, cfg)):
            if ckpt.shape(name) != shape:
                raise CheckpointError(f"{ckpt.file_of(name)}: {name} has shape {ckpt.shape(name)}, but config.json "
                                      f"implies {shape}")


def import_metadata(cfg: ModelConfig, family: Family, hf_config: dict, folder: str,
                    tokenizer: dict | None = None) -> CheckpointMetadata:
    """The metadata of an import: fp32 weights at iteration 0, the HF config kept for the way back, and the
    identity of the tokenizer it came with (``tokenizer_identity``), which the trainer checks data against."""
    return CheckpointMetadata(
        source=SOURCE_HUGGINGFACE,
        model_config=cfg,
        original_vocab_size=cfg.vocab_size,
        padded_vocab_size=padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1),
        dtype="fp32",
        iteration=0,
        consumed_train_samples=0,
        hf_source=HFSource(architecture=family.architecture, dtype=source_dtype(hf_config), config=hf_config,
                           path=os.path.abspath(folder), tokenizer=tokenizer),
        versions=Versions.installed(),
    )


def trainer_model_settings(cfg: ModelConfig) -> dict:
    """The trainer's model flags (``--yaml-cfg`` keys) that rebuild ``cfg``: the inverse of
    ``training.arguments.model_kwargs``; the vocabulary comes from the run's tokenizer."""
    d = cfg.to_dict()
    d.pop("vocab_size")
    d["untie_embeddings_and_output_weights"] = not d.pop("tie_embeddings")
    d["disable_bias_linear"] = not d.pop("add_bias_linear")
    return d


def write_param_atoms(folder: str, m: HFMapping, full: torch.Tensor, vocab_rows: int) -> None:
    """The atoms of one parameter in the universal folder ``folder``: its weights, zero moments, step 0."""
    os.makedirs(atom_dir(folder, m.name))
    keys = atom_keys(m.spec.kind, vocab_rows)
    weights, *moments = STATE_KEYS
    write_atom(make_atom(keys, full.to(torch.float32).contiguous()), atom_path(folder, m.name, weights))
    for key in moments:  # exp_avg, exp_avg_sq
        write_zero_atom(keys, tuple(full.shape), atom_path(folder, m.name, key))
    save(torch.tensor(0.0), atom_path(folder, m.name, STEP_KEY))  # AdamW's step, a float32 scalar


def verify_import(folder: str, mappings: list[HFMapping], ours) -> None:
    """Re-read every written weight atom and compare it bitwise with the source tensors, converted again."""
    for m in mappings:
        path = atom_path(folder, m.name, STATE_KEYS[0])
        stored = atom_tensor(load_file(path, meta=True))  # shape and place only; the bytes are read in chunks
        want = ours(m).to(torch.float32)
        if stored.shape != want.shape or not stored_equals(FlatRef.of(path, stored), want):
            raise CheckpointError(f"{path}: does not match the source tensors {', '.join(m.hf_names)}")


@contextlib.contextmanager
def _config_errors(path: str) -> Iterator[None]:
    """What config.json says that we cannot use, as one ``CheckpointError`` naming the file."""
    try:
        yield
    except (UnsupportedConfig, KeyError, ValueError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{path}: {what}") from None


def convert_hf_to_universal(hf_checkpoint_dir: str, save_dir: str, *, safe_serialization: bool | None = None,
                            overwrite: bool = False, make_vocab_size_divisible_by: int = 128,
                            _skip_qkv_reorder: bool = False, _skip_conv1d_transpose: bool = False,
                            _override_config: dict | None = None) -> HFImportReport:
    """Write the universal checkpoint of the HF model in ``hf_checkpoint_dir`` to ``save_dir``.

    ``latest_universal`` (naming ``save_dir``) goes into ``save_dir``'s parent: load with
    ``--load <parent> --universal-checkpoint``. The ``_``-prefixed arguments are negative controls (tests):
    a converter that skips a reorder or a transpose, or that reads config.json into a ModelConfig with
    some fields replaced (``_override_config``: rope scaling ignored, ``head_dim`` taken as hidden / heads,
    no q/k norms, ...; HF tensors the replaced config no longer maps are then left out).
    """
    t0 = time.time()
    hf_config = read_config(hf_checkpoint_dir)
    config_path = os.path.join(hf_checkpoint_dir, "config.json")
    with _config_errors(config_path):
        family, cfg = model_config_from_hf(hf_config, make_vocab_size_divisible_by)
    ckpt = open_hf_checkpoint(hf_checkpoint_dir, safe_serialization)
    with _config_errors(config_path):
        # before any table is built from the sizes config.json declares
        check_declared_sizes(hf_config, cfg, family, {n: ckpt.shape(n) for n in ckpt.names()})
        experts = expert_layout_of(ckpt.names(), cfg, family)
        dropped: frozenset[str] = frozenset()
        if _override_config:
            meant = {n for m in hf_mappings(cfg, family, experts) for n in m.hf_names}
            cfg = dataclasses.replace(cfg, **_override_config)
            family = family_of_model(cfg)
            dropped = frozenset(meant - {n for m in hf_mappings(cfg, family, experts) for n in m.hf_names})
    mappings = hf_mappings(cfg, family, experts)
    check_coverage(ckpt, mappings, cfg, family, dropped)

    inp, out = check_output_path(hf_checkpoint_dir, save_dir)
    extras = [f for f in TOKENIZER_FILES if os.path.lexists(os.path.join(inp, f))]
    extra_paths = [regular_file_inside(inp, f, inp) for f in extras]  # no link out of the folder is copied
    request = {"tool": "megatron_ucp.hf_to_universal", "input": inp,
               "input_fingerprint": fingerprint([ckpt.file_of(n) for n in ckpt.names()] + extra_paths
                                                + [os.path.join(inp, "config.json")]),
               "format": ckpt.format, "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
               "controls": [_skip_qkv_reorder, _skip_conv1d_transpose, _override_config or {}]}
    if finished_output(out, UNIVERSAL_KIND, request):
        remove_stale_temporaries(out)
        write_latest_universal(out)
        return HFImportReport(out, family.architecture, len(mappings), len(ckpt.names()), ckpt.format,
                              time.time() - t0, kept=True)
    check_replaceable(out, is_universal_folder, "a universal checkpoint folder", overwrite)

    def ours(m: HFMapping) -> torch.Tensor:
        hf = [ckpt.read_slice(n, m.expert) if m.combine is Combine.EXPERT and m.expert is not None else ckpt.read(n)
              for n in m.hf_names]  # a fused expert tensor: only this expert's bytes
        return to_ours(m, hf, cfg, _skip_qkv_reorder=_skip_qkv_reorder,
                       _skip_conv1d_transpose=_skip_conv1d_transpose)

    with staged_folder(out) as tmp:
        os.makedirs(zero_dir(tmp))
        for m in mappings:
            full = ours(m)
            write_param_atoms(tmp, m, full, cfg.vocab_size)
            del full
        tokenizer = None
        if extras:  # copied first: the tokenizer's identity is that of the files the folder keeps
            os.makedirs(os.path.join(tmp, HF_EXTRAS_DIR))
            for name, path in zip(extras, extra_paths):
                shutil.copyfile(path, os.path.join(tmp, HF_EXTRAS_DIR, name))
            tokenizer = tokenizer_identity(os.path.join(tmp, HF_EXTRAS_DIR))
        metadata = import_metadata(cfg, family, hf_config, inp, tokenizer)
        write_loader_files(tmp, client_state=client_state(metadata, tokens=0))
        with open(os.path.join(tmp, SOURCE_NOTE_FILE), "w") as f:
            f.write(f"Hugging Face {family.architecture} checkpoint {inp}\n")
        if ckpt.format == "bin":  # the reader that verification re-reads with, against torch.load's
            crosscheck_files(sorted({ckpt.file_of(n) for n in ckpt.names()}))
        verify_import(tmp, mappings, ours)
        write_marker(tmp, UNIVERSAL_KIND, request, verified=True,
                     extra={"iteration": metadata.iteration, "source": metadata.source})
    write_latest_universal(out)
    return HFImportReport(out, family.architecture, len(mappings), len(ckpt.names()), ckpt.format,
                          time.time() - t0)
