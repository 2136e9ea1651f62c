"""Small helpers shared by the tests (not a test module: it holds no tests)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

from megatron_ucp.layout.slicing import bitwise_equal

REPO = Path(__file__).resolve().parents[1]
# The data files in the repository the data and tokenizer tests read.
SP_MODEL = REPO / "data/tokenizer/austen-bpe-8k.model"
CORPUS = REPO / "data/austen/austen-novels.txt.xz"


def load_tool(name: str):
    """Import ``tools/<name>.py`` as a module (the tools are scripts, not a package), once per process: a
    second import would be a second module under the same name, whose functions no longer pickle (spawned
    ranks look them up by name) when two test files use the same tool in one worker."""
    path = REPO / "tools" / f"{name}.py"
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def assert_equal(actual, expected, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert bitwise_equal(actual, expected), f"{what}: not bitwise equal (max diff {(actual - expected).abs().max()})"


def assert_fails(fn, what: str) -> None:
    """Negative control: ``fn`` is a comparison that must fail, proving the check can see the error."""
    try:
        fn()
    except AssertionError:
        return
    raise AssertionError(f"negative control passed unexpectedly: {what}")


def load_param(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    assert p.shape == value.shape, f"value shape {tuple(value.shape)} does not fit parameter {tuple(p.shape)}"
    with torch.no_grad():
        p.copy_(value)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def close64(actual, expected, what: str) -> None:
    """float64 TP parity: TP only reorders floating-point sums (~1e-16 relative), while a real mistake (a
    wrong slice, a missing all-reduce, a bias added twice) is O(1)."""
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")


def same_forward_and_backward(dense, layer, x: torch.Tensor, g: torch.Tensor):
    """The TP = 1 layer and the TP layer on the same input and output gradient: their outputs and input
    gradients must be close (``close64``). Returns the dense output and the dense layer's parameter
    gradients by name."""
    xd, xl = leaf(x), leaf(x)
    yd = dense(xd)
    yd.backward(g)
    y = layer(xl)
    close64(y, yd.detach(), "layer output")
    y.backward(g)
    close64(xl.grad, xd.grad, "layer input grad")
    return yd, {n: p.grad for n, p in dense.named_parameters()}


def vouch_for(folder) -> None:
    """Mark a deliberately damaged universal folder as verified, so that the trainer loads it: the
    negative controls that use it test what the damage does to training, not the completion marker."""
    from megatron_ucp.checkpoint.publish import write_marker
    from megatron_ucp.checkpoint.universal import UNIVERSAL_KIND

    (Path(folder) / "megatron_ucp_complete.json").unlink(missing_ok=True)
    write_marker(str(folder), UNIVERSAL_KIND, {"test": "damaged on purpose"}, verified=True)


# --- The models and run settings the tests share (one definition each) -------------------------------

# The tiny GPT most real-checkpoint tests train, and the training settings they share.
TINY_GPT = dict(num_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=16,
                make_vocab_size_divisible_by=8, hidden_dropout=0.0, attention_dropout=0.0)
TINY_TRAIN = dict(micro_batch_size=1, global_batch_size=2, seq_length=16, dtype="fp32", mock_data=True, vocab_size=50,
                  eval_interval=0)
# The same GPT four layers deep: four pipeline stages, and layers 1..4 in the atom names.
GPT4 = dict(TINY_GPT, num_layers=4)
# The tiny Llama (RMSNorm, rotary, SwiGLU, GQA 8 heads / 2 KV heads, untied head, no biases).
TINY_LLAMA = dict(num_layers=4, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, ffn_hidden_size=96,
                  max_position_embeddings=16, make_vocab_size_divisible_by=8, hidden_dropout=0.0,
                  attention_dropout=0.0, swiglu=True, normalization="rmsnorm", use_rotary_position_embeddings=True,
                  tie_embeddings=False, add_bias_linear=False, model_family="llama")
VOCAB = 50
# The trainer's command-line flags of a one-layer, one-iteration fp32 mock-data run.
TINY_FLAGS = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16",
              "--make-vocab-size-divisible-by", "8", "--mock-data", "--vocab-size", "50", "--global-batch-size", "2",
              "--micro-batch-size", "1", "--train-iters", "1", "--eval-interval", "0", "--fp32"]
STATES = ("fp32", "exp_avg", "exp_avg_sq")


def run_cfg(tp: int, pp: int, **kw) -> dict:
    """``TrainConfig`` fields of a short fp32 mock-data run at TP ``tp`` and PP ``pp`` (global batch 4,
    one sample a micro batch, lr 1e-3 -> 1e-4, a loss logged every iteration); ``kw`` adds or overrides."""
    base = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, micro_batch_size=1,
                global_batch_size=4, seq_length=16, lr=1e-3, min_lr=1e-4, dtype="fp32", mock_data=True,
                vocab_size=VOCAB, log_interval=1, eval_interval=0)
    return {**base, **kw}


def gpt_cfg(tp: int, pp: int, dtype: str = "bf16", **kw) -> dict:
    """``run_cfg`` of the short GPT runs (``GPT4``): two iterations, bf16 unless told."""
    return run_cfg(tp, pp, **{"train_iters": 2, "lr_warmup_iters": 1, "dtype": dtype, **kw})


# The tiny mixture of experts (the tiny Llama's shape, mixtral family): 8 SwiGLU experts a layer, top-2.
TINY_MOE = dict(TINY_LLAMA, model_family="mixtral", num_experts=8, moe_top_k=2)
MOE_SAVE_AT, MOE_ITERS = 2, 3  # MoE sources save (and dump) at MOE_SAVE_AT; a resumed run goes on to MOE_ITERS


def moe_cfg(tp: int, pp: int, ep: int, zero: int = 1, **kw) -> dict:
    """``run_cfg`` of the MoE runs: expert parallel size ``ep``, ZeRO ``zero``, global batch 8, the same LR
    schedule whether a run stops at MOE_SAVE_AT or MOE_ITERS."""
    return run_cfg(tp, pp, **{"moe_expert_parallel_size": ep, "zero_stage": zero, "global_batch_size": 8,
                              "train_iters": MOE_SAVE_AT, "lr_warmup_iters": 1, "lr_decay_iters": MOE_ITERS, **kw})


# The Llama runs: LLAMA_ITERS iterations, resumed from the checkpoint of LLAMA_RESUME_AT.
LLAMA_ITERS, LLAMA_RESUME_AT = 12, 4


def llama_cfg(tp: int, pp: int, **kw) -> dict:
    """``run_cfg`` of the Llama runs: the same schedule whether a run stops at LLAMA_RESUME_AT or at
    LLAMA_ITERS (lr_decay_iters is fixed)."""
    return run_cfg(tp, pp, **{"train_iters": LLAMA_ITERS, "lr_warmup_iters": 2, "lr_decay_iters": LLAMA_ITERS,
                              **kw})


# --- Training runs (module level: ``run_distributed`` pickles them by name) ----------------------------

def train_model(rank, world_size, cfg_dict, model=TINY_GPT):
    """One rank of a training run of ``model`` (the tiny GPT unless given)."""
    from megatron_ucp.config import TrainConfig
    from megatron_ucp.training.trainer import train

    train(model, TrainConfig(**cfg_dict))


def train_and_dump(rank, world_size, cfg_dict, dump_dir, model, carry_on_to=None, loss_log=None):
    """Train (or just load, when train_iters == the loaded iteration), then dump the DP-gathered states
    (``dump_states``). With ``carry_on_to``, the same run then goes on to that iteration without saving,
    logging its losses to ``loss_log``: the uninterrupted run a resume from the saved checkpoint is
    compared with."""
    import dataclasses

    from megatron_ucp.config import TrainConfig
    from megatron_ucp.training.trainer import Trainer

    with Trainer(model, TrainConfig(**cfg_dict)) as trainer:
        trainer.build()
        trainer.load()
        trainer.run()
        dump_states(trainer, rank, dump_dir)
        if carry_on_to:
            trainer.cfg = dataclasses.replace(trainer.cfg, train_iters=carry_on_to, save=None, loss_log=loss_log)
            trainer.run()


def dump_states(trainer, rank, dump_dir):
    """Each parameter's DP-gathered fp32 master and Adam moments, written by DP rank 0 to ``rank{r}.pt``.
    An MoE model's experts are gathered over their expert-data-parallel group and written under their
    global names (``layout.experts``) by the DP ranks of expert-data-parallel rank 0 (one per
    expert-parallel rank); the other parameters by DP rank 0 alone."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from megatron_ucp.layout.experts import ExpertPlacement, expert_name

    engine, state = trainer.engine, trainer.state
    ep = state.size_of("ep")
    placement = ExpertPlacement(max(engine.num_experts), ep) if getattr(engine, "has_moe_layers", False) else None
    # DeepSpeed 0.19.8 links optimizer-state fragments lazily after the first group's step, before
    # the second group has state, so its accessors miss exp_avg of group 1; link again now.
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in trainer.model.named_parameters():
        got = {"fp32": safe_get_full_fp32_param(p).clone(),  # collectives: every rank asks for every parameter
               "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
               "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone()}
        if placement is not None and expert_name(name) is not None:
            if state.coords.dp < ep:  # expert-data-parallel rank 0 of its expert-parallel rank
                out[placement.global_name(name, state.rank_in("ep"))] = got
        elif state.zero_rank == 0:  # DP rank 0 (and Ulysses rank 0: the sp ranks hold the same parameters)
            out[name] = got
    if dump_dir and out:
        torch.save({"coords": (state.coords.pp, state.coords.tp), "state": out,
                    "global_steps": engine.global_steps, "lr_steps": engine.lr_scheduler.num_steps,
                    "weight_decay": [g["weight_decay"] for g in opt.param_groups]},
                   os.path.join(dump_dir, f"rank{rank}.pt"))


def assemble(dump_dir, model, vocab=VOCAB):
    """Full tensors per (name, state) from every rank's dump (``dump_states``): TP-merged, first stage
    for tied copies. Returns (tensors, vocabulary padding rows, global steps, lr scheduler steps)."""
    from megatron_ucp.config import ModelConfig
    from megatron_ucp.layout.params import Kind, model_params
    from megatron_ucp.layout.slicing import merge

    dumps = [torch.load(os.path.join(dump_dir, f), weights_only=False) for f in sorted(os.listdir(dump_dir))]
    cfg = ModelConfig(vocab_size=vocab, **model)
    full, padding = {}, {}
    for info in model_params(cfg):
        holders = sorted((d["coords"], d["state"][info.name]) for d in dumps if info.name in d["state"])
        first_pp = holders[0][0][0]
        per_tp = [st for (pp, _), st in holders if pp == first_pp]
        for key in STATES:
            t = merge([st[key] for st in per_tp], info.kind)
            if info.kind is Kind.VOCAB:
                padding[(info.name, key)] = t[vocab:]
                t = t[:vocab]
            full[(info.name, key)] = t
    return full, padding, dumps[0]["global_steps"], dumps[0]["lr_steps"]


def read_losses(path) -> dict:
    """Training losses by iteration from a ``--loss-log`` file."""
    with open(path) as f:
        return {r["iteration"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}


def ds_args(input_folder, output_folder):
    """The arguments of DeepSpeed's own converter (``ds_to_universal.main``), strict, one worker each."""
    import argparse

    return argparse.Namespace(input_folder=str(input_folder), output_folder=str(output_folder),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=False)


def byte_level_folder(out: Path, text: str, *, bos: bool) -> Path:
    """A byte-level BPE ``transformers`` tokenizer folder trained on ``text`` (vocabulary 400 plus an added
    token), with a BOS before every sequence when ``bos`` (the tokenizer's own rule)."""
    from megatron_ucp.data.preprocess import split_paragraphs
    from megatron_ucp.data.tokenizer import train_byte_level_bpe

    train_byte_level_bpe(split_paragraphs(text), 400, out, prepend_bos=bos, added_tokens=["<extra_0>"])
    return out


def load_and_dump(rank, world_size, cfg_dict, dump_dir, model, log_path=None, reversed_experts=False):
    """Build and load a run, dump its state right after the load (``dump_states``), then train on to
    ``train_iters``; rank 0's printout goes to ``log_path``. ``reversed_experts``: the load maps expert-
    parallel rank r's local experts to rank ``ep - 1 - r``'s global ones (a negative control)."""
    import contextlib
    import io

    from megatron_ucp.config import TrainConfig
    from megatron_ucp.training import checkpointing
    from megatron_ucp.training.trainer import Trainer

    if reversed_experts:
        checkpointing.expert_rank = lambda state: state.size_of("ep") - 1 - state.rank_in("ep")
    out = io.StringIO()
    with Trainer(model, TrainConfig(**cfg_dict)) as trainer, contextlib.redirect_stdout(out):
        trainer.build()
        trainer.load()
        dump_states(trainer, rank, dump_dir)
        trainer.run()
    if rank == 0 and log_path:
        with open(log_path, "w") as f:
            f.write(out.getvalue())


def run_refusal(world: int, model: dict, **train) -> str:
    """The one-line ValueError ``check_run`` raises for ``model`` and a short mock-data run with ``train``
    settings at ``world`` ranks (the message; a second line fails the test)."""
    import pytest

    from megatron_ucp.config import TrainConfig
    from megatron_ucp.training.arguments import check_run

    cfg = TrainConfig(**dict(dict(mock_data=True, vocab_size=VOCAB, global_batch_size=8, seq_length=16), **train))
    with pytest.raises(ValueError) as e:
        check_run(model, cfg, world)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)
