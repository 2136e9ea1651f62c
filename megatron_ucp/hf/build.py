"""A randomly initialised ``transformers`` model from a local config, for recipes and tests.

There is no model hub here: the fine-tuning recipe builds its "pretrained" model with ``transformers``
itself (any registered family's model, e.g. ``LlamaForCausalLM``, at random init) and saves it with
``save_pretrained``, its tokenizer beside it, exactly as a downloaded folder would be. The tokenizer is
our SentencePiece model (as a fast Llama tokenizer), another Hugging Face tokenizer folder, or a
byte-level BPE trained here on the bundled corpus (``--byte-level-bpe 32000``: a Llama 3-style folder).

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
import os
import sys
from pathlib import Path
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


BUNDLED_CORPUS = Path(__file__).resolve().parents[2] / "data" / "austen" / "austen-novels.txt.xz"
# Llama 3's special tokens: a trained byte-level BPE puts BOS before every sequence, as Llama 3's does.
LLAMA3_BOS, LLAMA3_EOS = "<|begin_of_text|>", "<|end_of_text|>"


def save_tokenizer(output_dir: str, *, tokenizer_model: str | None = None, byte_level_bpe: int | None = None,
                   corpus: str | os.PathLike = BUNDLED_CORPUS):
    """Write a Hugging Face tokenizer into ``output_dir`` and return it (a ``PreTrainedTokenizerFast``):

    * ``tokenizer_model`` a SentencePiece ``.model``: converted to a fast Llama tokenizer (the model file
      beside its ``tokenizer.json``; no BOS added, as our SentencePiece pipeline adds none);
    * ``tokenizer_model`` a Hugging Face tokenizer folder: loaded from local files and saved again;
    * ``byte_level_bpe`` N: an N-token byte-level BPE trained on ``corpus``'s paragraphs, with Llama 3's
      special tokens and its BOS rule."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    from megatron_ucp.data.preprocess import split_paragraphs
    from megatron_ucp.data.tokenizer import read_text, train_byte_level_bpe

    if byte_level_bpe is not None:
        tok = train_byte_level_bpe(split_paragraphs(read_text(corpus)), byte_level_bpe, output_dir,
                                   bos_token=LLAMA3_BOS, eos_token=LLAMA3_EOS, prepend_bos=True)
        if len(tok) < byte_level_bpe:  # the corpus ran out of merges: reserved special tokens fill the rest
            tok.add_special_tokens({"additional_special_tokens": [
                f"<|reserved_special_token_{i}|>" for i in range(byte_level_bpe - len(tok))]})
        tok.save_pretrained(output_dir)
        return tok
    assert tokenizer_model is not None
    source = Path(tokenizer_model)
    if not source.is_dir():  # a SentencePiece model: converted by transformers from a Llama folder of it
        import tempfile

        import sentencepiece as spm

        from megatron_ucp.hf.from_universal import write_sentencepiece_tokenizer

        sp = spm.SentencePieceProcessor(model_file=str(source))
        with tempfile.TemporaryDirectory() as work:
            write_sentencepiece_tokenizer(str(source), work, sp.bos_id(), sp.eos_id())
            tok = AutoTokenizer.from_pretrained(work, local_files_only=True, trust_remote_code=False)
    else:
        tok = AutoTokenizer.from_pretrained(str(source), local_files_only=True, trust_remote_code=False)
    tok.save_pretrained(output_dir)
    return tok


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    from megatron_ucp.families import FAMILIES

    p.add_argument("--family", choices=tuple(FAMILIES), required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer-model", help="the tokenizer: a SentencePiece .model, or a Hugging Face "
                                                  "tokenizer folder")
    source.add_argument("--byte-level-bpe", type=int, metavar="VOCAB",
                        help="train a VOCAB-token byte-level BPE (Llama 3's special tokens and BOS rule) on --corpus")
    p.add_argument("--corpus", default=str(BUNDLED_CORPUS), help="text (.txt or .txt.xz) for --byte-level-bpe")
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
    tok = save_tokenizer(args.output_dir, tokenizer_model=args.tokenizer_model, byte_level_bpe=args.byte_level_bpe,
                         corpus=args.corpus)
    vocab = len(tok)
    model = build_hf_model(args.family, vocab_size=vocab, num_layers=args.num_layers,
                           hidden_size=args.hidden_size, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                           ffn_hidden_size=args.ffn_hidden_size, max_position_embeddings=args.max_position_embeddings,
                           tie_embeddings=args.tie_embeddings, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, seed=args.seed, overrides=dict(args.settings))
    model.save_pretrained(args.output_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"built a random {type(model).__name__} ({n} parameters, vocab {vocab}, tokenizer "
          f"{type(tok).__name__}) in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
