#!/usr/bin/env python
"""Export a universal checkpoint of ours as a Hugging Face folder ``from_pretrained`` loads.

    python tools/universal_to_hf.py --input_folder RUN/universal/global_step100_universal \\
        --output_dir RUN/hf [--dtype bf16|fp16|fp32] [--max_shard_size 5GB] [--expert_layout per_expert|fused]

The input is written by our ZeRO converter (``tools/ds_to_universal.py``) or by
``tools/hf_to_universal.py``. Output: ``config.json``, ``generation_config.json`` when the end-of-text
id is known, safetensors shards (with ``model.safetensors.index.json`` when more than one), and the
tokenizer files when known. ``--dtype`` defaults to the HF source's dtype, else bf16.

From an HF import, only regular tokenizer files (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``, ``added_tokens.json``, ``tokenizer.model``, ``vocab.json``,
``merges.txt``) are taken from its ``hf_extras`` folder; links, ``config.json``,
``generation_config.json`` and code files are left out (a note on stderr names them), since the model's
configuration is always generated and verified here.

A mixture-of-experts model (Mixtral, Qwen3-MoE) is written with one tensor per expert by default, the
names the Hub's checkpoints and transformers 5's ``save_pretrained`` use (transformers 4 and 5 both
load them); ``--expert_layout fused`` writes transformers 5's fused ``mlp.experts.gate_up_proj`` /
``down_proj`` [E, ...] tensors instead (transformers 5 only).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


from megatron_ucp.cli import add_trust_flag, apply_trust_flag, run_tool
from megatron_ucp.hf.from_universal import DTYPES, convert_universal_to_hf
from megatron_ucp.layout.hf import ExpertLayout


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input_folder", required=True, help="a universal checkpoint folder (holding zero/)")
    p.add_argument("--output_dir", required=True, help="the Hugging Face folder to create")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the exported weights (default: the HF source's, else bf16)")
    p.add_argument("--max_shard_size", default="5GB", help="largest shard, e.g. 5GB or 500MB (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing Hugging Face model folder (only)")
    p.add_argument("--expert_layout", choices=[e.value for e in ExpertLayout], default=ExpertLayout.PER_EXPERT.value,
                   help="an MoE model's experts: one tensor per expert (default; transformers 4 and 5 load it) or "
                        "fused [E, ...] tensors per layer (transformers 5)")
    add_trust_flag(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_trust_flag(args)

    def body() -> int:
        report = convert_universal_to_hf(args.input_folder, args.output_dir, dtype=args.dtype,
                                         max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                         experts=args.expert_layout)
        print(report.summary())
        return 0

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
