"""``python -m megatron_ucp.families``: each family and the Hugging Face models it claims (and those refused).

``python -m megatron_ucp.families NAME --kv-heads K --ffn-hidden F`` prints the family's trainer flags:
the recipes (``examples_deepspeed/universal_checkpointing/common.sh``) take a family's flags from here,
so the shell scripts hold no per-family branches.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from megatron_ucp.families import FAMILIES, REFUSED, family_named, recipe_flags


def listing() -> list[str]:
    """One line per family (name, HF architecture, model_type), then one per refused HF model."""
    width = max(len(name) for name in FAMILIES)
    lines = [f"{f.name:<{width}}  {f.architecture} (model_type {f.model_type!r})" for f in FAMILIES.values()]
    lines += [f"{'-':<{width}}  {r.architecture} (model_type {r.model_type!r}): refused, {r.why}" for r in REFUSED]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_ucp.families", description=__doc__.split("\n\n")[0])
    p.add_argument("family", nargs="?", help=f"print this family's trainer flags; one of: {', '.join(FAMILIES)}")
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--ffn-hidden", type=int)
    args = p.parse_args(argv)
    if args.family is None:
        print("\n".join(listing()))
        return 0
    if args.kv_heads is None or args.ffn_hidden is None:
        p.error("the following arguments are required with a family: --kv-heads, --ffn-hidden")
    try:
        family = family_named(args.family)
    except ValueError as e:
        print(f"error: MODEL_FAMILY: {e}", file=sys.stderr)
        return 2
    print(" ".join(recipe_flags(family, args.kv_heads, args.ffn_hidden)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
