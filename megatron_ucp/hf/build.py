"""A randomly initialised ``transformers`` model from a local config, for recipes and tests.

There is no model hub here: the fine-tuning recipe builds its "pretrained" model with ``transformers``
itself (any registered family's model, e.g. ``LlamaForCausalLM``, at random init), with the vocabulary of our
SentencePiece tokenizer, and saves it with ``save_pretrained`` exactly as a downloaded one would be.

    python -m megatron_ucp.hf.build --family llama --tokenizer-model data/tokenizer/austen-bpe-8k.model \\
        --num-layers 2 --hidden-size 64 --num-heads 4 --num-kv-heads 2 --ffn-hidden-size 128 \\
        --max-position-embeddings 64 --output-dir RUN/hf_init

``--set KEY=JSON`` adds config entries, e.g. a Llama 3.1-style model with its rope scaling and an
explicit head dimension::

    python -m megatron_ucp.hf.build --family llama ... --set head_dim=32 \
        --set 'rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}'
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def build_hf_model(family: str, *, vocab_size: int, num_layers: int, hidden_size: int, num_heads: int,
                   num_kv_heads: int | None = None, ffn_hidden_size: int | None = None,
                   max_position_embeddings: int = 64, tie_embeddings: bool | None = None, bos_token_id=None,
                   eos_token_id=None, seed: int = 0, overrides: dict | None = None):
    """The ``transformers`` model of ``family`` (``megatron_ucp.families``) at random init, in eval mode;
    ``overrides`` are further config entries (``head_dim``, ``rope_parameters``, ``sliding_window``, ...)."""
    from megatron_ucp.families import family_named

    builder = family_named(family).hf_model
    torch.manual_seed(seed)
    model: PreTrainedModel = builder(
        vocab_size=vocab_size, num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
        num_kv_heads=num_kv_heads, ffn_hidden_size=ffn_hidden_size, max_position_embeddings=max_position_embeddings,
        tie_embeddings=tie_embeddings, bos_token_id=bos_token_id, eos_token_id=eos_token_id, overrides=overrides)
    return model.eval()


def parse_setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE as JSON (a bare word is a string): one ``--set`` of the command line."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected KEY=VALUE, the value in JSON")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    from megatron_ucp.families import FAMILIES

    p.add_argument("--family", choices=tuple(FAMILIES), required=True)
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece model: vocabulary size and bos/eos ids")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=None)
    p.add_argument("--ffn-hidden-size", type=int, default=None)
    p.add_argument("--max-position-embeddings", type=int, default=64)
    p.add_argument("--tie-embeddings", action="store_true", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="settings", type=parse_setting, action="append", default=[], metavar="KEY=JSON",
                   help="a further config.json entry, e.g. head_dim=32 or rope_parameters='{\"rope_type\": "
                        "\"llama3\", ...}' (repeatable)")
    p.add_argument("--output-dir", required=True)
    args = p.parse_args(argv)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=args.tokenizer_model)
    model = build_hf_model(args.family, vocab_size=sp.get_piece_size(), num_layers=args.num_layers,
                           hidden_size=args.hidden_size, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                           ffn_hidden_size=args.ffn_hidden_size, max_position_embeddings=args.max_position_embeddings,
                           tie_embeddings=args.tie_embeddings, bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(),
                           seed=args.seed, overrides=dict(args.settings))
    model.save_pretrained(args.output_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"built a random {type(model).__name__} ({n} parameters, vocab {sp.get_piece_size()}) in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
