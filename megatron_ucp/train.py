"""Entry point: ``python -m megatron_ucp.train [flags]`` under torchrun or the deepspeed launcher."""

from __future__ import annotations

import sys
from typing import Sequence

from megatron_ucp.checkpoint.trust import CheckpointError
from megatron_ucp.training.arguments import model_kwargs, parse_args, train_config
from megatron_ucp.training.trainer import train


def main(argv: Sequence[str] | None = None) -> int:
    values = parse_args(argv)
    try:
        cfg = train_config(values)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train(model_kwargs(values), cfg)
    except CheckpointError as e:  # a bad --load: one line, not a traceback per rank
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
