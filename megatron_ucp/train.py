"""Entry point: ``python -m megatron_ucp.train [flags]`` under torchrun or the deepspeed launcher.

The flags are parsed and the whole run validated (for the launcher's ``WORLD_SIZE``) before the
trainer, and with it DeepSpeed, is even imported: a bad flag is one ``error:`` line and exit code 2,
with no distributed start-up.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from megatron_ucp.checkpoint.trust import CheckpointError, one_line
from megatron_ucp.training.arguments import configs_from_flags


def _refuse(e: BaseException) -> int:
    """Exit code 2 with ``error: <what>``, printed by local rank 0 only.

    Every rank of a launch parses the same flags and fails the same way; one line per node is enough.
    """
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    try:
        model_kwargs, cfg = configs_from_flags(argv)
        if cfg.save:  # a link where the saves would write: refused once per node, before start-up
            from megatron_ucp.training.checkpointing import check_save_folder, saved_iterations

            check_save_folder(cfg.save, saved_iterations(cfg.train_iters, cfg.save_interval))
        folder = metadata = None
        if cfg.load:  # a missing or malformed model-state file: refused once per node, before start-up
            from megatron_ucp.training.checkpointing import check_load_folder

            folder, metadata = check_load_folder(cfg.load, cfg.universal_checkpoint, cfg.ckpt_step)
        from megatron_ucp.training.identity import check_run_tokenizer

        # data made by another tokenizer, or a model imported with another one: refused before start-up
        check_run_tokenizer(cfg, folder, metadata)
    except (ValueError, OSError) as e:
        return _refuse(e)
    from megatron_ucp.training.trainer import PeerGone, train  # imports DeepSpeed: only for a valid run

    try:
        train(model_kwargs, cfg)
    except CheckpointError as e:  # a bad --load: one line, not a traceback per rank
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except PeerGone as e:  # a failure, for an elastic agent to restart the job
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
