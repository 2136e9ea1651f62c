"""Run logs: TensorBoard scalars under Megatron's tags and ``loss.jsonl`` at full precision.

Only global rank 0 writes. ``loss.jsonl`` holds one JSON object per line: ``split`` ("train" or
"valid"), ``iteration``, ``loss``, and for training ``lr``, ``grad_norm``, ``consumed_samples``
(and ``moe_loss`` for an MoE model: its load-balancing loss, averaged over micro-batches and data
parallelism), plus the ``topology``. Python's float repr round-trips exactly, so comparisons can be bitwise.
"""

from __future__ import annotations

import json
import os
from typing import Any
from megatron_ucp.atomic import atomic_write

TAG_TRAIN_LOSS = "lm-loss-training/lm loss"
TAG_VALID_LOSS = "lm-loss-validation/lm loss validation"
TAG_LR = "learning-rate/learning-rate"
TAG_GRAD_NORM = "grad-norm/grad-norm"
TAG_MOE_LOSS = "moe-loss/moe loss"  # an MoE model's load-balancing loss (unweighted, summed over layers)


def read_loss_log(path: str) -> list[dict[str, Any]]:
    """Records of a loss.jsonl; a later record for the same (split, iteration) replaces an earlier one."""
    records: dict[tuple[str, int], dict] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = (rec["split"], int(rec["iteration"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: not a loss record ({e})") from None
            records[key] = rec
    return [records[k] for k in sorted(records, key=lambda k: (k[0], k[1]))]


class RunLogger:
    def __init__(self, tensorboard_dir: str | None, loss_log: str | None, topology: dict,
                 resume_iteration: int = 0) -> None:
        self.topology = topology
        self.writer = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        self.loss_log = loss_log
        if loss_log:
            os.makedirs(os.path.dirname(os.path.abspath(loss_log)), exist_ok=True)
            self._truncate_after(loss_log, resume_iteration)

    def _truncate_after(self, loss_log: str, iteration: int) -> None:
        """A resumed run replaces records past its start instead of appending duplicates."""
        if not os.path.exists(loss_log):
            return
        kept = [r for r in read_loss_log(loss_log) if r["iteration"] <= iteration]
        atomic_write(loss_log, "".join(json.dumps(rec) + "\n" for rec in kept))

    def _append(self, record: dict) -> None:
        if self.loss_log:
            with open(self.loss_log, "a") as f:
                f.write(json.dumps(record) + "\n")

    def train_step(self, iteration: int, loss: float, lr: float, grad_norm: float | None,
                   consumed_samples: int, moe_loss: float | None = None) -> None:
        if self.writer:
            self.writer.add_scalar(TAG_TRAIN_LOSS, loss, iteration)
            self.writer.add_scalar(TAG_LR, lr, iteration)
            if grad_norm is not None:
                self.writer.add_scalar(TAG_GRAD_NORM, grad_norm, iteration)
            if moe_loss is not None:
                self.writer.add_scalar(TAG_MOE_LOSS, moe_loss, iteration)
        record = {"split": "train", "iteration": iteration, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "consumed_samples": consumed_samples}
        if moe_loss is not None:
            record["moe_loss"] = moe_loss
        self._append(dict(record, topology=self.topology))

    def validation(self, iteration: int, loss: float) -> None:
        if self.writer:
            self.writer.add_scalar(TAG_VALID_LOSS, loss, iteration)
        self._append({"split": "valid", "iteration": iteration, "loss": loss, "topology": self.topology})

    def close(self) -> None:
        if self.writer:
            self.writer.flush()
            self.writer.close()
