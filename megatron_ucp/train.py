"""Entry point: ``python -m megatron_ucp.train [flags]`` under torchrun or the deepspeed launcher."""

from __future__ import annotations

import sys
from typing import Sequence

from megatron_ucp.training.arguments import model_kwargs, parse_args, train_config
from megatron_ucp.training.trainer import train


def main(argv: Sequence[str] | None = None) -> int:
    values = parse_args(argv)
    try:
        cfg = train_config(values)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train(model_kwargs(values), cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
