"""``python -m megatron_ucp.families NAME --kv-heads K --ffn-hidden F``: the family's trainer flags.

The recipes (``examples_deepspeed/universal_checkpointing/common.sh``) take a family's flags from here,
so the shell scripts hold no per-family branches.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from megatron_ucp.families import FAMILIES, family_named, recipe_flags


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_ucp.families", description=__doc__.split("\n\n")[0])
    p.add_argument("family", help=f"one of: {', '.join(FAMILIES)}")
    p.add_argument("--kv-heads", type=int, required=True)
    p.add_argument("--ffn-hidden", type=int, required=True)
    args = p.parse_args(argv)
    try:
        family = family_named(args.family)
    except ValueError as e:
        print(f"error: MODEL_FAMILY: {e}", file=sys.stderr)
        return 2
    print(" ".join(recipe_flags(family, args.kv_heads, args.ffn_hidden)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
