#!/usr/bin/env python
"""Convert a Hugging Face checkpoint of a supported family into a universal checkpoint our trainer loads.

    python tools/hf_to_universal.py --hf_checkpoint_dir HF_DIR --save_dir RUN/universal/hf_universal
    # then: --load RUN/universal --universal-checkpoint --finetune (at any TP/PP)

Reads ``model.safetensors`` or ``pytorch_model.bin``, single or sharded (``*.index.json``), one tensor
at a time (a mixture-of-experts model's experts one tensor per expert, as the Hub and
``save_pretrained`` store them, or fused per layer as transformers 5's modules hold them: then only
each expert's slice is read); writes fp32 atoms with zero Adam moments and step 0, DeepSpeed's model-state and
``zero/optimizer_state.pt`` files, our metadata, and ``latest_universal`` in the save folder's parent.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


from megatron_ucp.cli import add_trust_flag, apply_trust_flag, run_tool
from megatron_ucp.hf.to_universal import convert_hf_to_universal


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf_checkpoint_dir", required=True, help="a save_pretrained folder (config.json + weights)")
    p.add_argument("--save_dir", required=True, help="the universal checkpoint folder to create")
    p.add_argument("--safe_serialization", action="store_true",
                   help="read the safetensors weights (default: safetensors if present, else pytorch_model.bin)")
    p.add_argument("--make_vocab_size_divisible_by", type=int, default=128,
                   help="vocabulary padding recorded in the model config (default 128)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing universal checkpoint folder (only)")
    p.add_argument("--model_args_yaml", default=None,
                   help="also write the trainer's model settings for this model (use with --yaml-cfg)")
    add_trust_flag(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_trust_flag(args)

    def body() -> int:
        report = convert_hf_to_universal(args.hf_checkpoint_dir, args.save_dir,
                                         safe_serialization=True if args.safe_serialization else None,
                                         overwrite=args.overwrite,
                                         make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
        print(report.summary())
        if args.model_args_yaml:
            import yaml

            from megatron_ucp.config import ModelConfig
            from megatron_ucp.hf.from_universal import read_universal_metadata
            from megatron_ucp.hf.to_universal import trainer_model_settings

            cfg = ModelConfig.from_dict(read_universal_metadata(report.output_folder)["model_config"])
            with open(args.model_args_yaml, "w") as f:
                yaml.safe_dump(trainer_model_settings(cfg), f, sort_keys=False)
            print(f"trainer model settings: {args.model_args_yaml} (pass --yaml-cfg)")
        return 0

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
