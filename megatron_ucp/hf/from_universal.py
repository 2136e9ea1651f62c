"""Universal checkpoint -> Hugging Face folder (``config.json``, safetensors shards, tokenizer files).

The input is any universal folder of ours: written by our ZeRO converter (``tools/ds_to_universal.py``)
or by ``hf_to_universal``. Its ``megatron_ucp`` metadata gives the model config, and so the HF family
and tensor names (``layout/hf.py``); each parameter's ``fp32.pt`` atom is read through a memory map,
split into its HF tensors, cast and added to the current shard, which is written when full. Shards
are planned from the shapes first, so names (``model-0000k-of-0000n.safetensors``) are final when
written; memory stays at one shard plus one parameter. Every shard is re-read and checked against
the atoms before the folder is published (``checkpoint/publish.py``); tokenizer files are copied
only when they are regular files inside the input (a path in the metadata only when it is a
SentencePiece model).

A mixture-of-experts model's experts are written one tensor per expert (``save_pretrained``'s layout:
transformers 4's own names, which transformers 5 fuses on load) or, asked, fused per layer (transformers
5's modules): a fused tensor is assembled from its E expert atoms, one slice each.

From an HF import's ``hf_extras`` folder only the tokenizer files of ``EXTRAS_ALLOWED`` are taken,
each only when it is a regular file directly inside an ``hf_extras`` that is itself a real folder
(no symbolic link is followed, at either level). ``config.json``, ``generation_config.json`` and
any code (``*.py``) are never taken from the input: they are generated here, so nothing a checkpoint
carries can replace the verified model description or bring code that ``trust_remote_code`` would
run. What is left out is named in one note on stderr; the export goes on without it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import sys
import time
from dataclasses import dataclass

import torch

from megatron_ucp.checkpoint.atoms import atom_tensor
from megatron_ucp.checkpoint.format import (
    HF_EXTRAS_DIR,
    STATE_KEYS,
    CheckpointMetadata,
    atom_path,
    model_states_name,
    read_metadata,
)
from megatron_ucp.checkpoint.publish import (
    check_output_path,
    check_replaceable,
    fingerprint,
    finished_output,
    folder_files,
    remove_stale_temporaries,
    staged_folder,
    write_marker,
)
from megatron_ucp.checkpoint.zero import CheckpointError, load_file
from megatron_ucp.families import family_of_model, hf_config_from_model
from megatron_ucp.hf.transforms import hf_shapes, to_hf
from megatron_ucp.layout.hf import Combine, ExpertLayout, HFMapping, hf_mappings
from megatron_ucp.layout.slicing import bitwise_equal

HF_EXPORT_KIND = "hf_export"  # the completion marker's kind for an exported Hugging Face folder
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_FROM_HF_NAME = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# Tokenizer files (data, no code) an export copies from ``hf_extras``; everything else there is left out.
EXTRAS_ALLOWED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "tokenizer.model", "vocab.json", "merges.txt")
# Config keys that name code for ``trust_remote_code`` to fetch and run; our families need none.
CODE_KEYS = ("auto_map", "custom_pipelines")


@dataclass
class HFExportReport:
    output_dir: str
    architecture: str
    tensors: int
    shards: int
    dtype: str
    seconds: float
    kept: bool = False  # a finished, verified export of the same request was already there

    def summary(self) -> str:
        if self.kept:
            return f"{self.output_dir}: already exported from this checkpoint and verified: kept as it is"
        return (f"wrote a {self.architecture} ({self.tensors} tensors, {self.dtype}, {self.shards} shard"
                f"{'s' if self.shards != 1 else ''}) to {self.output_dir} in {self.seconds:.2f} s")


def parse_size(text: str | int) -> int:
    """``5GB``, ``500MB``, ``10KB`` or a byte count -> bytes (decimal units, as transformers)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def read_folder_metadata(folder: str) -> CheckpointMetadata:
    """The metadata of a universal folder, from its first model-state file, checked and upgraded."""
    path = os.path.join(folder, model_states_name(0))
    meta = read_metadata(path)
    if meta is None:
        raise CheckpointError(f"{path}: no megatron_ucp metadata; not written by megatron_ucp "
                              "(or by hf_to_universal)")
    return meta


def read_universal_metadata(folder: str) -> dict:
    """``read_folder_metadata`` as plain JSON data, in the current format (for callers that want a dict)."""
    return read_folder_metadata(folder).to_dict()


def _default_dtype(meta: CheckpointMetadata) -> str:
    src = meta.hf_source.dtype if meta.hf_source else None
    return _FROM_HF_NAME.get(str(src).replace("torch.", ""), "bf16") if src else "bf16"


def _token_ids(meta: CheckpointMetadata, run_tokenizer: str | None) -> dict:
    """bos/eos ids: from the HF source's config, the run's Hugging Face tokenizer folder (``run_tokenizer``,
    ``_run_tokenizer_folder``'s answer), or our SentencePiece model."""
    src = meta.hf_source.config if meta.hf_source else {}
    ids = {k: src[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if src.get(k) is not None}
    if run_tokenizer and not ids:
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(run_tokenizer, local_files_only=True, trust_remote_code=False)
        ids = {f"{k}_token_id": getattr(hf_tok, f"{k}_token_id") for k in ("bos", "eos", "pad")}
        ids = {k: int(v) for k, v in ids.items() if v is not None}
    tok = _tokenizer_model(meta)
    if not ids and tok:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=tok)
        ids = {k: v for k, v in (("bos_token_id", sp.bos_id()), ("eos_token_id", sp.eos_id())) if v >= 0}
    return ids


def _tokenizer_model(meta: CheckpointMetadata) -> str | None:
    """The SentencePiece model the metadata names, if it is one: a path read from a checkpoint is
    copied into the export only after it loads as a SentencePiece model."""
    tc = meta.train_config or {}
    path = tc.get("tokenizer_model")
    if tc.get("tokenizer_type", "SentencePieceTokenizer") != "SentencePieceTokenizer" or not isinstance(path, str):
        return None
    if not path or not os.path.isfile(path):
        return None
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError, ValueError):
        raise CheckpointError(f"{path}: named as the tokenizer model by the checkpoint's metadata, but it is not "
                              "a SentencePiece model; refusing to copy it into the export") from None
    return path


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _without_code_keys(data: bytes, path: str) -> tuple[bytes, list[str]]:
    """``tokenizer_config.json``'s bytes, without ``CODE_KEYS`` (and the keys dropped)."""
    try:
        cfg = json.loads(data)
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    dropped = [k for k in CODE_KEYS if isinstance(cfg, dict) and k in cfg]
    if not dropped:
        return data, []  # byte for byte as imported
    return json.dumps({k: v for k, v in cfg.items() if k not in CODE_KEYS}, indent=2).encode(), dropped


def _copy_extras(input_folder: str, folder: str) -> list[str] | None:
    """Copy the allowed tokenizer files of ``<input>/hf_extras`` into ``folder``; None without a usable
    ``hf_extras`` (absent, a link or not a folder: then it is not read at all)."""
    return _copy_tokenizer_files(os.path.join(input_folder, HF_EXTRAS_DIR), folder)


def _copy_tokenizer_files(extras: str, folder: str, report: bool = True) -> list[str] | None:
    """Copy the allowed tokenizer files of the folder ``extras`` into ``folder``; None when ``extras`` is
    absent, a link or not a folder (then it is not read at all).

    Every file is opened relative to the folder's handle with ``O_NOFOLLOW`` and checked to be a
    regular file on the open descriptor, so a link cannot be swapped in between check and copy. ``report``:
    say which files were left out (not for a model folder, where the others are its weights and config)."""
    if not os.path.lexists(extras):
        return None
    try:
        dir_fd = os.open(extras, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        what = "a symbolic link" if os.path.islink(extras) else "not a folder"
        _say(f"{extras}: is {what}; no tokenizer file is taken from it")
        return None
    written, left_out = [], []
    try:
        for name in sorted(os.listdir(dir_fd)):
            path = os.path.join(extras, name)
            if name not in EXTRAS_ALLOWED:
                left_out.append(name)
                continue
            if not stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                left_out.append(f"{name} (not a regular file)")
                continue
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise OSError(e.errno, e.strerror, path) from None
                left_out.append(f"{name} (not a regular file)")  # became a link since the check above
                continue
            with os.fdopen(fd, "rb") as src:
                if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                    left_out.append(f"{name} (not a regular file)")
                    continue
                data = src.read()
            if name == "tokenizer_config.json":
                data, dropped = _without_code_keys(data, path)
                if dropped:
                    left_out.append(f"{name}'s {' and '.join(dropped)} (names code to run)")
            with open(os.path.join(folder, name), "xb") as dst:  # a new file in our own staging folder
                dst.write(data)
            written.append(name)
    finally:
        os.close(dir_fd)
    if left_out and report:
        _say(f"{extras}: left out of the export (only regular tokenizer files are copied; config.json and "
             f"generation_config.json are generated, code is never copied): {', '.join(left_out)}")
    return written


def _run_tokenizer_folder(meta: CheckpointMetadata, say: bool = False) -> str | None:
    """The Hugging Face tokenizer folder a training run used (``--tokenizer-type HFTokenizer``), when its
    files still hash to the run's record (``CheckpointMetadata.tokenizer``); None otherwise (``say``: and
    a line saying why, when the metadata names one)."""
    tc = meta.train_config or {}
    path, record = tc.get("tokenizer_model"), meta.tokenizer
    if tc.get("tokenizer_type") != "HFTokenizer" or not isinstance(path, str) or record is None:
        return None
    from megatron_ucp.data.tokenizer import files_sha256, hf_tokenizer_files

    try:
        digest = files_sha256(hf_tokenizer_files(path)) if os.path.isdir(path) else None
    except (OSError, ValueError) as e:
        if say:
            _say(f"{path}: the run's tokenizer folder cannot be read ({e}); the export has no tokenizer")
        return None
    if digest != record["sha256"]:
        if say:
            _say(f"{path}: {'is not a folder' if digest is None else 'its files changed'} since training (the "
                 f"checkpoint records sha256 {record['sha256'][:12]}...); the export has no tokenizer")
        return None
    return path


def write_sentencepiece_tokenizer(model: str, folder: str, bos_id: int | None, eos_id: int | None,
                                  model_max_length: int | None = None) -> list[str]:
    """Our SentencePiece ``model`` as a Hugging Face (slow) Llama tokenizer in ``folder``: the model file and a
    ``tokenizer_config.json`` that adds no BOS or EOS (our pipeline adds none) and names the pieces of
    ``bos_id`` / ``eos_id`` (None: not named). Returns the names written."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    shutil.copy2(model, os.path.join(folder, "tokenizer.model"))
    cfg = {"tokenizer_class": "LlamaTokenizer", "model_max_length": model_max_length,
           "add_bos_token": False, "add_eos_token": False, "legacy": True,
           "bos_token": sp.id_to_piece(bos_id) if bos_id is not None else None,
           "eos_token": sp.id_to_piece(eos_id) if eos_id is not None else None,
           "unk_token": sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None}
    if model_max_length is None:
        del cfg["model_max_length"]
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return ["tokenizer.model", "tokenizer_config.json"]


def _write_tokenizer(meta: CheckpointMetadata, folder: str, input_folder: str, run_tokenizer: str | None,
                     ids: dict) -> list[str]:
    """Copy the source's tokenizer files (HF import), the run's Hugging Face tokenizer folder
    (``run_tokenizer``) or our SentencePiece model (training metadata); ``ids``: ``_token_ids``'s."""
    written = _copy_extras(input_folder, folder)
    if written is not None:
        return written
    written = (_copy_tokenizer_files(run_tokenizer, folder, report=False) if run_tokenizer else None) or []
    tok = _tokenizer_model(meta)
    if tok:
        written += write_sentencepiece_tokenizer(tok, folder, ids.get("bos_token_id"), ids.get("eos_token_id"),
                                                 meta.model_config.max_position_embeddings)
    return written


def _plan_shards(entries: list[tuple[str, tuple[int, ...]]], itemsize: int, max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in entries:
        n = itemsize
        for d in shape:
            n *= d
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def is_hf_folder(path: str) -> bool:
    """A Hugging Face model folder: ``config.json`` beside weights."""
    names = set(os.listdir(path))
    return "config.json" in names and any(n.endswith((".safetensors", ".bin", ".index.json")) for n in names)


def verify_export(folder: str, files: list[str], shards: list[list[str]], shard_tensors) -> None:
    """Re-read every written shard and compare each tensor bitwise with the atoms, converted again."""
    from safetensors import safe_open

    for file, names in zip(files, shards):
        path = os.path.join(folder, file)
        want = shard_tensors(names)
        with safe_open(path, framework="pt") as f:
            if sorted(f.keys()) != sorted(want):
                raise CheckpointError(f"{path}: holds {sorted(f.keys())[:3]}..., expected {sorted(want)[:3]}...")
            for name, t in want.items():
                got = f.get_tensor(name)
                if not bitwise_equal(got, t):
                    raise CheckpointError(f"{path}: {name} does not match the universal checkpoint it came from")


def convert_universal_to_hf(input_folder: str, output_dir: str, *, dtype: str | None = None,
                            max_shard_size: str | int = "5GB", overwrite: bool = False,
                            experts: ExpertLayout | str = ExpertLayout.PER_EXPERT) -> HFExportReport:
    """Write ``output_dir`` as a ``from_pretrained``-loadable HF folder of the universal checkpoint; an MoE
    model's experts one tensor per expert (``save_pretrained``'s and the Hub's layout, which transformers 4
    and 5 both load) or ``experts="fused"`` (transformers 5's modules, one [E, ...] tensor per layer)."""
    from safetensors.torch import save_file

    t0 = time.time()
    meta = read_folder_metadata(input_folder)
    cfg = meta.model_config
    family = family_of_model(cfg)
    dtype = dtype or _default_dtype(meta)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    experts = ExpertLayout(experts)
    mappings = hf_mappings(cfg, family, experts)

    # HF names and shapes, in table order, from the shapes alone; a fused expert tensor is made of E mappings.
    shapes: dict[str, tuple[int, ...]] = {}
    owners: dict[str, list[HFMapping]] = {}
    for m in mappings:
        for name, shape in zip(m.hf_names, hf_shapes(m, cfg)):
            shapes.setdefault(name, shape)
            owners.setdefault(name, []).append(m)
    entries = list(shapes.items())
    shards = _plan_shards(entries, torch.empty((), dtype=torch_dtype).element_size(), parse_size(max_shard_size))
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    inp, out = check_output_path(input_folder, output_dir)
    request = {"tool": "megatron_ucp.universal_to_hf", "input": inp,
               "input_fingerprint": fingerprint([os.path.join(inp, f) for f in folder_files(inp)]),
               "dtype": dtype, "max_shard_size": parse_size(max_shard_size)}
    if cfg.is_moe:
        request["experts"] = experts.value
    if finished_output(out, HF_EXPORT_KIND, request):
        remove_stale_temporaries(out)
        return HFExportReport(out, family.architecture, len(entries), n, dtype, time.time() - t0, kept=True)
    check_replaceable(out, is_hf_folder, "a Hugging Face model folder", overwrite)

    def shard_tensors(names: list[str]) -> dict[str, torch.Tensor]:
        tensors = {name: torch.empty(shapes[name], dtype=torch_dtype) for name in names
                   if owners[name][0].combine is Combine.EXPERT}  # filled one expert's slice at a time
        for m in dict.fromkeys(m for name in names for m in owners[name]):  # each parameter once, in order
            path = atom_path(input_folder, m.name, STATE_KEYS[0])
            full = atom_tensor(load_file(path, mmap=True))
            if tuple(full.shape) != tuple(m.spec.shape(cfg)):
                raise CheckpointError(f"{path}: shape {tuple(full.shape)}, but the model config implies "
                                      f"{tuple(m.spec.shape(cfg))}")
            for name, t in zip(m.hf_names, to_hf(m, full, cfg)):
                if name not in names:
                    continue
                if m.combine is Combine.EXPERT:
                    tensors[name][m.expert] = t
                else:
                    tensors[name] = t.to(torch_dtype).contiguous()
            del full
        return tensors

    with staged_folder(out) as tmp:
        weight_map, total = {}, 0
        for file, names in zip(files, shards):
            tensors = shard_tensors(names)
            save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update({name: file for name in tensors})
            del tensors
        if n > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                          indent=2)
        base = dict(meta.hf_source.config if meta.hf_source else {})
        base.pop("torch_dtype", None)
        for key in CODE_KEYS:  # our families are built into transformers: no code to name
            base.pop(key, None)
        run_tokenizer = _run_tokenizer_folder(meta, say=True)  # hashed once, for the ids and the copy
        ids = _token_ids(meta, run_tokenizer)
        base.update(hf_config_from_model(cfg, HF_DTYPE_NAMES[torch_dtype], ids))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(base, f, indent=2, sort_keys=True)
        written = _write_tokenizer(meta, tmp, input_folder, run_tokenizer, ids)
        if "generation_config.json" not in written and "eos_token_id" in ids:
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(dict(ids, _from_model_config=True), f, indent=2)
        verify_export(tmp, files, shards, shard_tensors)
        write_marker(tmp, HF_EXPORT_KIND, request, verified=True)
    return HFExportReport(out, family.architecture, len(entries), n, dtype, time.time() - t0)

