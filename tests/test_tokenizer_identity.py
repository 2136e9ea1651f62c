"""The tokenizer is checked, not assumed: an HF import records its tokenizer's identity, and a run whose data
sidecar, tokenizer and loaded checkpoint disagree is refused in one line before start-up.

Tokenizers are byte-level BPE folders built here (``test_hf_tokenizer``'s builder): A and B trained on different
text, and A+10 (A with ten more added tokens). The model is a tiny GPT-2 whose vocabulary is A's, imported once
with A's files beside it and once with none.
"""

from __future__ import annotations

import dataclasses
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
                   f"by {describe(b)}; the data was made by another tokenizer than the model's (pass "
                   "--allow-vocab-extension if the change is deliberate)")
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
                   f"{describe(b)}; train with the model's own tokenizer (its hf_extras folder), or pass "
                   "--allow-vocab-extension if the change is deliberate")
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
    # the flag says it is deliberate: the check passes (the loader initialises the new rows, tested below)
    _passes(_flags(world, "a10", "a10", "bare", "--allow-vocab-extension"))
    # ... and a tokenizer other than the import's, with data made by it
    _passes(_flags(world, "a10", "a10", "with_a", "--allow-vocab-extension"))
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


def _extended(rank, world_size, load, stage, tp, vocab, out):
    from megatron_ucp.config import TrainConfig
    from megatron_ucp.hf.logits import model_kwargs_of
    from megatron_ucp.training.trainer import Trainer

    kwargs, _ = model_kwargs_of(os.path.join(load, "hf_universal"))
    cfg = TrainConfig(zero_stage=stage, no_pipeline_parallel=stage > 1, tensor_model_parallel_size=tp,
                      micro_batch_size=1, global_batch_size=2, seq_length=16, train_iters=1, finetune=True,
                      dtype="fp32", mock_data=True, vocab_size=vocab, load=load, universal_checkpoint=True,
                      eval_interval=0, allow_vocab_extension=True)
    with Trainer(kwargs, cfg) as trainer:
        trainer.build()
        resumed = trainer.load()
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "word_embeddings" in n}
        moments = {}
        opt = trainer.engine.optimizer
        for lp in opt.bit16_groups[0] if stage < 3 and hasattr(opt, "bit16_groups") else []:
            if "word_embeddings" in opt.param_names[lp] and lp._hp_mapping is not None:
                moments[opt.param_names[lp]] = lp._hp_mapping.optim_fragment["exp_avg"].clone()
        torch.save({"params": params, "moments": moments, "note": resumed.note,
                    "model_cfg": trainer.model_cfg.to_dict(), "padded": trainer.model.padded_vocab},
                   os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage,tp", [(1, 2), (2, 1)])
def test_a_deliberate_vocab_extension_initialises_the_new_rows_as_a_fresh_model(world, tmp_path, stage, tp):
    """--allow-vocab-extension with ten more tokens than the import: rows the import has load exactly, the ten
    new rows are the trainer's own init of a model with the larger vocabulary (the same at every layout),
    the padding rows stay zero, and the load reports the new rows."""
    from dist_utils import run_distributed
    from megatron_ucp.config import ModelConfig
    from megatron_ucp.layout.init import full_init
    from megatron_ucp.layout.params import model_params

    rows = HFTokenizer(world["a"]).vocab_size
    load = str(world["bare"])
    run_distributed(_extended, 2, load, stage, tp, rows + 10, str(tmp_path))
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    name = "tied_modules.embed.word_embeddings.weight"  # GPT-2 ties its head to the embedding
    model_cfg = ModelConfig.from_dict(got[0]["model_cfg"])
    assert model_cfg.vocab_size == rows + 10
    padded = got[0]["padded"]
    info = next(i for i in model_params(model_cfg) if i.name == name)
    fresh = full_init(info, model_cfg, 1234, padded)
    saved = torch.load(world["bare"] / "hf_universal" / "zero" / name / "fp32.pt", weights_only=False)["param"]
    assert saved.shape[0] == rows
    full = torch.cat([got[r]["params"][name] for r in range(tp)]) if tp > 1 else got[0]["params"][name]
    assert full.shape[0] == padded
    assert torch.equal(full[:rows], saved), "the import's rows"
    assert torch.equal(full[rows:rows + 10], fresh[rows:rows + 10]), "the new rows: a fresh model's"
    assert not torch.equal(fresh[rows:rows + 10], torch.zeros_like(fresh[rows:rows + 10]))  # control: not zeros
    assert torch.count_nonzero(full[rows + 10:]) == 0, "padding rows"
    moments = [m for r in range(2) for m in got[r]["moments"].values()]
    assert moments and all(torch.count_nonzero(m) == 0 for m in moments)  # an import's are zero, the new rows' too
    assert (f"vocabulary extended from {rows} to {rows + 10} rows: rows {rows}..{rows + 9} of {name}"
            in got[0]["note"]), got[0]["note"]


def test_a_training_checkpoint_is_held_to_the_tokenizer_it_recorded(world):
    """A training checkpoint records its run's tokenizer; resuming it on data made by another tokenizer is
    refused in one line naming both, and the same data and tokenizer pass."""
    from types import SimpleNamespace

    from megatron_ucp.config import ModelConfig, TrainConfig
    from megatron_ucp.layout.topology import ParallelLayout
    from megatron_ucp.training.checkpointing import build_metadata
    from megatron_ucp.training.identity import check_tokenizer_identity

    a = _record(world["a"])
    model = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=a["vocab_size"],
                        max_position_embeddings=16)
    run = TrainConfig(micro_batch_size=1, global_batch_size=1, seq_length=8, train_iters=1, dtype="fp32",
                      data_path=str(world["data_a"]), tokenizer_type="HFTokenizer", tokenizer_model=str(world["a"]))
    meta = build_metadata(model, run, SimpleNamespace(layout=ParallelLayout(1, 1, 1)), 512, [0, 4], a)
    assert meta.tokenizer == a and CheckpointMetadata.from_dict(meta.to_dict()).tokenizer == a
    b_run = dataclasses.replace(run, data_path=str(world["data_b"]), tokenizer_model=str(world["b"]))
    with pytest.raises(ValueError) as e:
        check_tokenizer_identity(b_run, HFTokenizer(world["b"]), "ckpt", meta)
    assert str(e.value) == (f"ckpt: trained with tokenizer {describe(a)}, but {sidecar_path(world['data_b'])} says "
                            f"the data was made by {describe(_record(world['b']))}; the data was made by another "
                            "tokenizer than the model's (pass --allow-vocab-extension if the change is deliberate)")
    check_tokenizer_identity(run, HFTokenizer(world["a"]), "ckpt", meta)  # control: its own tokenizer and data
