"""The tokenizer a run uses, checked against the data it reads and the checkpoint it loads, before start-up.

Three records can name a tokenizer: the one the run builds (``--tokenizer-type`` and its files), the
sidecar ``<data-path>.tokenizer.json`` preprocessing wrote beside the dataset, and an HF import's
``hf_source.tokenizer`` (the tokenizer files it copied into ``hf_extras``). Any two that are present
must agree on type, sha256 and vocabulary size; otherwise token ids mean different things in the data,
the embedding and the tokenizer, and training would run on without a sign of it.

A training checkpoint records its run's tokenizer the same way (``CheckpointMetadata.tokenizer``), so a
resume on data made by another tokenizer is refused as well.

A tokenizer with more tokens than the loaded checkpoint's vocabulary (its ``original_vocab_size``) is
refused too. ``--allow-vocab-extension`` says a change of tokenizer (new tokens, a larger vocabulary) is
deliberate: the checkpoint's record is then not held against the run's tokenizer (the data must still
be the run tokenizer's), and the sliced loader initialises the rows the checkpoint lacks as a fresh
model's (``training.sliced_load.NewVocabRows``).

Each refusal is one ``ValueError`` line naming both sides (files or folders). Nothing here needs
torch.distributed: the entry point runs it once per node, with the metadata ``check_load_folder`` read.
"""

from __future__ import annotations

import os
from typing import Any

from megatron_ucp.checkpoint.format import CheckpointMetadata, check_tokenizer_record, describe_tokenizer, read_json
from megatron_ucp.config import TrainConfig


def tokenizer_source(cfg: TrainConfig) -> str:
    """The flags that name the run's tokenizer, as they are given."""
    if cfg.mock_data:
        return f"--vocab-size {cfg.vocab_size}"
    if cfg.tokenizer_type == "GPT2BPETokenizer":
        return f"--vocab-file {cfg.vocab_file} --merge-file {cfg.merge_file}"
    return f"--tokenizer-model {cfg.tokenizer_model}"


describe = describe_tokenizer  # ``HFTokenizer sha256 0123456789ab..., vocab 8000``


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same type and files; same vocabulary size where both records know it."""
    if (a["type"], a["sha256"]) != (b["type"], b["sha256"]):
        return False
    return a.get("vocab_size") is None or b.get("vocab_size") is None or a["vocab_size"] == b["vocab_size"]


def read_sidecar(data_path: str) -> tuple[str, dict[str, Any] | None]:
    """(the sidecar's path, its checked record, or None when the dataset has no sidecar)."""
    from megatron_ucp.data.preprocess import sidecar_path

    path = sidecar_path(data_path)
    if not os.path.lexists(path):
        return path, None
    return path, check_tokenizer_record(read_json(path, "a dataset's tokenizer record"), path, sidecar=True)


def check_tokenizer_identity(cfg: TrainConfig, tokenizer: Any = None, load_folder: str | None = None,
                             metadata: CheckpointMetadata | None = None) -> None:
    """Refuse (``ValueError``, one line) a run whose tokenizer, data sidecar and loaded checkpoint disagree.

    ``tokenizer``: the run's tokenizer (None with ``--mock-data``); ``load_folder`` and ``metadata``: the
    checkpoint folder ``--load`` resumes from and our metadata in it (``checkpointing.check_load_folder``).
    """
    source = tokenizer_source(cfg)
    built = None
    if tokenizer is not None:
        built = {**tokenizer.identity, "vocab_size": int(tokenizer.vocab_size)}
    sidecar_file, sidecar = (None, None) if cfg.mock_data or cfg.data_path is None else read_sidecar(cfg.data_path)
    if built is not None and sidecar is not None and not same_tokenizer(sidecar, built):
        raise ValueError(f"{sidecar_file}: the dataset was made by tokenizer {describe(sidecar)}, but {source} is "
                         f"{describe(built)}; preprocess the data with this tokenizer (or use the one that made it)")
    if metadata is None:
        return
    recorded, how = checkpoint_tokenizer(metadata)
    extending = cfg.allow_vocab_extension
    if recorded is not None and not extending:
        if sidecar is not None and not same_tokenizer(recorded, sidecar):
            raise ValueError(f"{load_folder}: {how} tokenizer {describe(recorded)}, but {sidecar_file} says the "
                             f"data was made by {describe(sidecar)}; the data was made by another tokenizer than "
                             "the model's (pass --allow-vocab-extension if the change is deliberate)")
        if sidecar is None and built is not None and not same_tokenizer(recorded, built):
            raise ValueError(f"{load_folder}: {how} tokenizer {describe(recorded)}, but {source} is "
                             f"{describe(built)}; train with the model's own tokenizer"
                             f"{' (its hf_extras folder)' if metadata.hf_source is not None else ''}, or pass "
                             "--allow-vocab-extension if the change is deliberate")
    vocab = int(tokenizer.vocab_size) if tokenizer is not None else cfg.vocab_size
    rows = metadata.original_vocab_size
    if vocab is not None and vocab > rows and not extending:
        raise ValueError(f"{source}: {vocab} tokens, more than the {rows} of the vocabulary of {load_folder} "
                         "(its original_vocab_size); pass --allow-vocab-extension if the extension is deliberate")


def checkpoint_tokenizer(metadata: CheckpointMetadata) -> tuple[dict[str, Any] | None, str]:
    """(the tokenizer record a checkpoint keeps, or None; how it came by it, in words)."""
    if metadata.hf_source is not None:
        return metadata.hf_source.tokenizer, "imported with"
    return metadata.tokenizer, "trained with"


def check_run_tokenizer(cfg: TrainConfig, load_folder: str | None = None,
                        metadata: CheckpointMetadata | None = None) -> None:
    """``check_tokenizer_identity`` for the run ``cfg`` describes, building its tokenizer only when there is
    something to check it against (a data sidecar or a loaded checkpoint's metadata)."""
    tokenizer = None
    if not cfg.mock_data and cfg.data_path is not None:
        from megatron_ucp.data.preprocess import sidecar_path
        from megatron_ucp.data.tokenizer import build_tokenizer

        if metadata is not None or os.path.lexists(sidecar_path(cfg.data_path)):
            tokenizer = build_tokenizer(cfg.tokenizer_type, tokenizer_model=cfg.tokenizer_model,
                                        vocab_file=cfg.vocab_file, merge_file=cfg.merge_file)
    check_tokenizer_identity(cfg, tokenizer, load_folder, metadata)
