"""The tokenizer is checked, not assumed: an HF import records its tokenizer's identity, and a run whose data
sidecar, tokenizer and loaded checkpoint disagree is refused in one line before start-up.

Tokenizers are byte-level BPE folders built here (``test_hf_tokenizer``'s builder): A and B trained on different
text, and A+10 (A with ten more added tokens). The model is a tiny GPT-2 whose vocabulary is A's, imported once
with A's files beside it and once with none.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_ucp.checkpoint.format import CheckpointMetadata, read_metadata
from megatron_ucp.checkpoint.zero import model_state_files
from megatron_ucp.data.preprocess import preprocess, sidecar_path
from megatron_ucp.data.tokenizer import HFTokenizer, read_text
from megatron_ucp.hf.to_universal import convert_hf_to_universal
from megatron_ucp.train import main
from megatron_ucp.training.arguments import configs_from_flags
from megatron_ucp.training.checkpointing import check_load_folder
from megatron_ucp.training.identity import check_run_tokenizer, describe
from helpers import CORPUS
from helpers import byte_level_folder as _byte_level_folder

TEXT = read_text(CORPUS)
MODEL = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16",
         "--global-batch-size", "2", "--micro-batch-size", "1", "--train-iters", "1", "--eval-interval", "0", "--fp32"]


def _record(folder: Path) -> dict:
    tok = HFTokenizer(folder)
    return {**tok.identity, "vocab_size": tok.vocab_size}


def _hf_gpt2(folder: Path, vocab: int, tokenizer: Path | None) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    GPT2LMHeadModel(config).save_pretrained(folder)
    if tokenizer is not None:
        for name in os.listdir(tokenizer):
            shutil.copyfile(tokenizer / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("identity")
    a = _byte_level_folder(root / "tok_a", TEXT[:40_000], bos=False)
    b = _byte_level_folder(root / "tok_b", TEXT[200_000:240_000], bos=False)
    bigger = root / "tok_a10"
    from transformers import AutoTokenizer

    grown = AutoTokenizer.from_pretrained(str(a), local_files_only=True)
    grown.add_tokens([f"<new_{i}>" for i in range(10)])
    grown.save_pretrained(str(bigger))
    vocab = HFTokenizer(a).vocab_size
    out = {"a": a, "b": b, "a10": bigger}
    for name, tok in (("with_a", a), ("bare", None)):
        convert_hf_to_universal(str(_hf_gpt2(root / f"hf_{name}", vocab, tok)), str(root / name / "hf_universal"))
        out[name] = root / name
    for name in ("a", "b", "a10"):
        (root / f"in_{name}.txt").write_text(TEXT[:3_000])
        report = preprocess(root / f"in_{name}.txt", root / f"data_{name}", "HFTokenizer", tokenizer_model=out[name])
        out[f"data_{name}"] = Path(report.outputs["text"])
    return out


def _flags(world, data: str, tok: str, load: str | None, *extra: str) -> list[str]:
    flags = MODEL + ["--data-path", str(world[f"data_{data}"]), "--tokenizer-type", "HFTokenizer",
                     "--tokenizer-model", str(world[tok])]
    if load is not None:
        flags += ["--load", str(world[load]), "--universal-checkpoint"]
    return flags + list(extra)


def _refusal(capsys, flags: list[str]) -> str:
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.rstrip("\n")


def _passes(flags: list[str]) -> None:
    """The check main runs before start-up, alone (main would go on to train)."""
    _, cfg = configs_from_flags(flags, environ={})
    folder, meta = check_load_folder(cfg.load, cfg.universal_checkpoint) if cfg.load else (None, None)
    check_run_tokenizer(cfg, folder, meta)


def test_an_import_records_the_identity_of_its_tokenizer(world):
    folder = world["with_a"] / "hf_universal"
    meta = read_metadata(model_state_files(str(folder))[0])
    assert meta is not None and meta.hf_source is not None
    assert meta.hf_source.tokenizer == _record(world["a"])
    assert meta.hf_source.tokenizer == _record(folder / "hf_extras")  # the copies hash as the source files
    assert meta.hf_source.tokenizer["vocab_size"] == meta.original_vocab_size
    assert json.loads(Path(sidecar_path(world["data_a"])).read_text())["sha256"] == meta.hf_source.tokenizer["sha256"]
    from megatron_ucp.checkpoint.inspect import describe_universal

    assert f"  imported with tokenizer {describe(_record(world['a']))}" in describe_universal(str(folder))
    bare = read_metadata(model_state_files(str(world["bare"] / "hf_universal"))[0])
    assert bare is not None and bare.hf_source is not None and bare.hf_source.tokenizer is None

    # metadata written before the record existed (no "tokenizer" key) still reads, as None
    old = meta.to_dict()
    del old["hf_source"]["tokenizer"]
    assert CheckpointMetadata.from_dict(old).hf_source.tokenizer is None
    assert CheckpointMetadata.from_dict(meta.to_dict()) == meta
    bad = meta.to_dict()
    bad["hf_source"]["tokenizer"]["sha256"] = "x"
    with pytest.raises(ValueError, match=r"^f: megatron_ucp\.hf_source\.tokenizer\.sha256: expected 64 lowercase "
                                         r"hex digits, found str 'x'$"):
        CheckpointMetadata.from_dict(bad, where="f: megatron_ucp")


def test_data_made_by_another_tokenizer_than_the_models_is_refused(world, capsys):
    folder = world["with_a"] / "hf_universal"
    sidecar = sidecar_path(world["data_b"])
    a, b = _record(world["a"]), _record(world["b"])
    assert a["sha256"] != b["sha256"]
    got = _refusal(capsys, _flags(world, "b", "b", "with_a"))
    assert got == (f"error: {folder}: imported with tokenizer {describe(a)}, but {sidecar} says the data was made "
                   f"by {describe(b)}; the data was made by another tokenizer than the model's")
    # data and run tokenizer disagree, with no checkpoint at all
    got = _refusal(capsys, _flags(world, "b", "a", None))
    assert got == (f"error: {sidecar}: the dataset was made by tokenizer {describe(b)}, but --tokenizer-model "
                   f"{world['a']} is {describe(a)}; preprocess the data with this tokenizer (or use the one that "
                   "made it)")
    # no sidecar: the checkpoint's tokenizer against the run's
    bare_data = world["data_b"].parent / "nosidecar"
    for suffix in (".bin", ".idx"):
        shutil.copyfile(f"{world['data_b']}{suffix}", f"{bare_data}{suffix}")
    flags = _flags(world, "b", "b", "with_a")
    flags[flags.index("--data-path") + 1] = str(bare_data)
    got = _refusal(capsys, flags)
    assert got == (f"error: {folder}: imported with tokenizer {describe(a)}, but --tokenizer-model {world['b']} is "
                   f"{describe(b)}; train with the model's own tokenizer (its hf_extras folder)")
    # negative controls: the same tokenizer everywhere passes, with and without a checkpoint
    _passes(_flags(world, "a", "a", "with_a"))
    _passes(_flags(world, "b", "b", None))
    _passes(_flags(world, "a", "a", "bare"))


def test_library_callers_get_the_data_check_when_the_datasets_are_built(world):
    from megatron_ucp.training.trainer import build_datasets

    _, cfg = configs_from_flags(_flags(world, "a", "a", None, "--split", "1,1,0"), environ={})
    assert build_datasets(cfg)[2] == HFTokenizer(world["a"]).vocab_size
    _, cfg = configs_from_flags(_flags(world, "b", "a", None, "--split", "1,1,0"), environ={})
    with pytest.raises(ValueError) as e:
        build_datasets(cfg)
    assert str(e.value) == (f"{sidecar_path(world['data_b'])}: the dataset was made by tokenizer "
                            f"{describe(_record(world['b']))}, but --tokenizer-model {world['a']} is "
                            f"{describe(_record(world['a']))}; preprocess the data with this tokenizer (or use the "
                            "one that made it)")
def test_a_tokenizer_larger_than_the_embedding_is_refused(world, capsys):
    folder = world["bare"] / "hf_universal"
    rows = HFTokenizer(world["a"]).vocab_size
    assert HFTokenizer(world["a10"]).vocab_size == rows + 10
    got = _refusal(capsys, _flags(world, "a10", "a10", "bare"))
    assert got == (f"error: --tokenizer-model {world['a10']}: {rows + 10} tokens, more than the {rows} of the "
                   f"vocabulary of {folder} (its original_vocab_size); pass --allow-vocab-extension if the extension "
                   "is deliberate")
    # the flag says it is deliberate, but extension is not supported yet: a refusal that says so
    got = _refusal(capsys, _flags(world, "a10", "a10", "bare", "--allow-vocab-extension"))
    assert got == (f"error: --allow-vocab-extension: extending the vocabulary of {folder} from {rows} to {rows + 10} "
                   f"rows (10 new, for --tokenizer-model {world['a10']}) is not supported yet: the loaders would "
                   "leave the new rows zero instead of initialising them")
    # mock data: --vocab-size is the vocabulary
    load = ["--load", str(world["bare"]), "--universal-checkpoint"]
    mock = MODEL + ["--mock-data", "--vocab-size", str(rows + 1)] + load
    assert _refusal(capsys, mock) == (f"error: --vocab-size {rows + 1}: {rows + 1} tokens, more than the {rows} of the "
                                      f"vocabulary of {folder} (its original_vocab_size); pass --allow-vocab-extension "
                                      "if the extension is deliberate")
    # negative controls: the model's own size passes, and so does a smaller one
    _passes(_flags(world, "a", "a", "bare"))
    _passes(MODEL + ["--mock-data", "--vocab-size", str(rows)] + load)
    _passes(MODEL + ["--mock-data", "--vocab-size", str(rows - 1)] + load)


@pytest.mark.slow
def test_the_models_own_tokenizer_and_data_train(world, tmp_path):
    """Positive control through the real entry point: the import, its tokenizer and data made by it pass the
    check and one fine-tuning step runs (one rank, the environment torchrun would set)."""
    import subprocess
    import sys

    import yaml

    from dist_utils import free_port
    from helpers import REPO
    from megatron_ucp.config import ModelConfig
    from megatron_ucp.hf.logits import model_kwargs_of
    from megatron_ucp.hf.to_universal import trainer_model_settings

    kwargs, vocab = model_kwargs_of(str(world["with_a"] / "hf_universal"))
    settings = trainer_model_settings(ModelConfig(vocab_size=vocab, **kwargs))
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(settings))
    flags = _flags(world, "a", "a", "with_a", "--finetune", "--split", "1,1,0", "--log-interval", "1")
    flags = ["--yaml-cfg", str(tmp_path / "model.yaml")] + flags[6:]  # the model's shape from its import, not MODEL's
    assert flags[2] == "--seq-length"
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "megatron_ucp.train", *flags], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"vocab {vocab} (padded" in run.stdout and "iteration      1/1" in run.stdout


def test_a_malformed_sidecar_is_refused_in_one_line_naming_it(world, tmp_path, capsys):
    prefix = tmp_path / "d"
    for suffix in (".bin", ".idx"):
        shutil.copyfile(f"{world['data_a']}{suffix}", f"{prefix}{suffix}")
    sidecar = Path(sidecar_path(prefix))
    flags = _flags(world, "a", "a", None)
    flags[flags.index("--data-path") + 1] = str(prefix)
    record = json.loads(Path(sidecar_path(world["data_a"])).read_text())
    sidecar.write_text(json.dumps(dict(record, sha256="zz")))
    assert _refusal(capsys, flags) == f"error: {sidecar}.sha256: expected 64 lowercase hex digits, found str 'zz'"
    sidecar.write_text(json.dumps({k: v for k, v in record.items() if k != "eod"}))
    assert _refusal(capsys, flags) == f"error: {sidecar}: missing key 'eod'"
    sidecar.write_text("{")
    assert _refusal(capsys, flags).startswith(f"error: {sidecar}: not valid JSON: ")
    sidecar.write_text(json.dumps(record))  # control: the record preprocessing wrote passes
    _passes(flags)
