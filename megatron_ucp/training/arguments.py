"""Command-line flags (Megatron-LM names) and ``--yaml-cfg``, converted once into config dataclasses.

A YAML file holds the same settings as the flags, keyed by flag name with dashes or underscores
(``num-layers: 4`` or ``num_layers: 4``); flags given on the command line override it.
"""

from __future__ import annotations

import argparse
from typing import Sequence

import yaml

from megatron_ucp.config import TrainConfig

# (flag, type, default, help); types: int, float, str, bool (store_true)
_MODEL_FLAGS = [
    ("--num-layers", int, 4, "transformer layers"),
    ("--hidden-size", int, 256, "hidden size"),
    ("--num-attention-heads", int, 8, "attention heads"),
    ("--ffn-hidden-size", int, None, "MLP hidden size (default 4 x hidden)"),
    ("--max-position-embeddings", int, None, "position embeddings (default: --seq-length)"),
    ("--make-vocab-size-divisible-by", int, 128, "pad the vocabulary to a multiple of this x TP"),
    ("--layernorm-epsilon", float, 1e-5, "LayerNorm epsilon"),
    ("--hidden-dropout", float, 0.1, "dropout on embeddings and residual branches"),
    ("--attention-dropout", float, 0.1, "dropout on attention probabilities"),
    ("--init-method-std", float, 0.02, "std of the normal initialisation"),
    ("--swiglu", bool, False, "SwiGLU MLP (Llama family)"),
    ("--normalization", str, "layernorm", "layernorm | rmsnorm"),
    ("--use-rotary-position-embeddings", bool, False, "rotary position embeddings instead of learned ones"),
    ("--rope-theta", float, 10000.0, "rotary base"),
    ("--num-key-value-heads", int, None, "key/value heads for grouped-query attention (default: all heads)"),
    ("--untie-embeddings-and-output-weights", bool, False, "a separate output head"),
    ("--disable-bias-linear", bool, False, "no biases in linear layers"),
]

_TRAIN_FLAGS = [
    ("--tensor-model-parallel-size", int, 1, "tensor parallel degree"),
    ("--pipeline-model-parallel-size", int, 1, "pipeline parallel degree"),
    ("--zero-stage", int, 1, "DeepSpeed ZeRO stage (2 and 3 train the non-pipeline model, PP 1; 3 needs TP 1)"),
    ("--no-pipeline-parallel", bool, False, "train the non-pipeline model (same parameter names; PP 1)"),
    ("--micro-batch-size", int, 1, "samples per micro batch per data-parallel rank"),
    ("--global-batch-size", int, 8, "samples per optimizer step, fixed whatever the layout"),
    ("--seq-length", int, 256, "tokens per sample"),
    ("--train-iters", int, 100, "optimizer steps to train to"),
    ("--lr", float, 3e-4, "peak learning rate"),
    ("--min-lr", float, 3e-5, "learning rate at the end of decay"),
    ("--lr-warmup-iters", int, 0, "linear warmup steps"),
    ("--lr-decay-iters", int, None, "steps of decay (default --train-iters)"),
    ("--lr-decay-style", str, "cosine", "cosine | linear | constant"),
    ("--weight-decay", float, 0.1, "AdamW weight decay (not on biases and norms)"),
    ("--adam-beta1", float, 0.9, "Adam beta1"),
    ("--adam-beta2", float, 0.95, "Adam beta2"),
    ("--adam-eps", float, 1e-8, "Adam epsilon"),
    ("--clip-grad", float, 1.0, "gradient clipping by global norm (0 disables)"),
    ("--seed", int, 1234, "random seed"),
    ("--data-path", str, None, "prefix of a preprocessed dataset (.bin/.idx)"),
    ("--mock-data", bool, False, "deterministic random tokens instead of a dataset"),
    ("--split", str, "969,30,1", "train,valid,test weights over documents"),
    ("--tokenizer-type", str, "SentencePieceTokenizer", "SentencePieceTokenizer | GPT2BPETokenizer"),
    ("--tokenizer-model", str, None, "SentencePiece model file"),
    ("--vocab-file", str, None, "GPT-2 vocab.json"),
    ("--merge-file", str, None, "GPT-2 merges.txt"),
    ("--vocab-size", int, None, "vocabulary size for --mock-data"),
    ("--log-interval", int, 10, "iterations between progress lines"),
    ("--eval-interval", int, 20, "iterations between validations (0 disables)"),
    ("--eval-iters", int, 4, "global batches per validation"),
    ("--tensorboard-dir", str, None, "TensorBoard event folder"),
    ("--loss-log", str, None, "loss.jsonl path (full-precision losses)"),
    ("--save", str, None, "checkpoint folder"),
    ("--save-interval", int, None, "iterations between checkpoints"),
    ("--load", str, None, "checkpoint folder to resume from"),
    ("--universal-checkpoint", bool, False, "--load is a universal checkpoint (any topology)"),
    ("--no-load-rng", bool, False, "do not restore RNG states on resume"),
    ("--trust-checkpoint-code", bool, False,
     "unpickle --load files with full pickle, which runs any code they carry (default: an allowlist)"),
    ("--finetune", bool, False, "after --load, start iteration, data position and LR schedule fresh"),
    ("--deepspeed-config", str, None, "JSON whose keys override the generated DeepSpeed config"),
    ("--ds-config-out", str, None, "write the DeepSpeed config used here"),
]


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a Megatron-style GPT on DeepSpeed.")
    p.add_argument("--yaml-cfg", default=None, help="YAML file of the same settings as the flags")
    p.add_argument("--bf16", action="store_const", const="bf16", dest="dtype", help="bf16 mixed precision (default)")
    p.add_argument("--fp16", action="store_const", const="fp16", dest="dtype", help="fp16 with dynamic loss scaling")
    p.add_argument("--fp32", action="store_const", const="fp32", dest="dtype", help="full fp32")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    for flag, typ, default, help_ in _MODEL_FLAGS + _TRAIN_FLAGS:
        if typ is bool:
            p.add_argument(flag, action="store_true", default=None, help=help_)
        else:
            p.add_argument(flag, type=typ, default=None, help=f"{help_} (default {default})")
    return p


def _defaults() -> dict:
    d = {_dest(flag): default for flag, _, default, _ in _MODEL_FLAGS + _TRAIN_FLAGS}
    d["dtype"] = "bf16"
    return d


def parse_args(argv: Sequence[str] | None = None) -> dict:
    """Flags over YAML over defaults, as one plain dict keyed by underscore names."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    values = _defaults()
    if ns.yaml_cfg:
        with open(ns.yaml_cfg) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{ns.yaml_cfg}: expected a mapping of settings, got {type(loaded).__name__}")
        for key, value in loaded.items():
            dest = str(key).replace("-", "_")
            if dest in ("bf16", "fp16", "fp32"):
                if value:
                    values["dtype"] = dest
                continue
            if dest not in values:
                raise ValueError(f"{ns.yaml_cfg}: unknown setting {key!r}")
            values[dest] = value
    for dest, value in vars(ns).items():
        if dest in ("yaml_cfg", "local_rank") or value is None:
            continue
        values[dest] = value
    if values["max_position_embeddings"] is None:
        values["max_position_embeddings"] = values["seq_length"]
    return values


MODEL_KEYS = tuple(_dest(f) for f, *_ in _MODEL_FLAGS)


def train_config(values: dict) -> TrainConfig:
    return TrainConfig(**{k: v for k, v in values.items() if k not in MODEL_KEYS})


def model_kwargs(values: dict) -> dict:
    """ModelConfig fields from the flags; the trainer adds vocab_size from the tokenizer."""
    out = {k: values[k] for k in MODEL_KEYS}
    out["tie_embeddings"] = not out.pop("untie_embeddings_and_output_weights")
    out["add_bias_linear"] = not out.pop("disable_bias_linear")
    return out
