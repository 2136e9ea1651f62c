"""Learning-rate schedule: linear warmup, then cosine (or linear/constant) decay to a minimum.

``lr_at(step)`` is a pure function of the optimizer step (1-based: the LR used by step k), so a
resume at any layout continues the same curve. ``LRScheduler`` adapts it to DeepSpeed's scheduler
protocol (``step``, ``state_dict``, ``load_state_dict``); DeepSpeed saves its state in every
checkpoint, universal ones included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    max_lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    style: str = "cosine"  # cosine | linear | constant

    def __post_init__(self) -> None:
        if self.style not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown lr decay style {self.style!r}: expected cosine, linear or constant")
        if self.min_lr > self.max_lr:
            raise ValueError(f"min lr {self.min_lr} exceeds max lr {self.max_lr}")
        if self.warmup_iters < 0 or self.decay_iters < self.warmup_iters:
            raise ValueError(f"need 0 <= warmup iters ({self.warmup_iters}) <= decay iters ({self.decay_iters})")

    def lr_at(self, step: int) -> float:
        """LR of optimizer step ``step`` (1 = the first step)."""
        if self.warmup_iters and step <= self.warmup_iters:
            return self.max_lr * step / self.warmup_iters
        if self.style == "constant":
            return self.max_lr
        if step > self.decay_iters:
            return self.min_lr
        # The first step after warmup uses max_lr; the curve reaches min_lr after step decay_iters.
        ratio = (step - 1 - self.warmup_iters) / max(1, self.decay_iters - self.warmup_iters)
        if self.style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
        return self.min_lr + (self.max_lr - self.min_lr) * coeff


class LRScheduler:
    """Sets every param group's LR to ``schedule.lr_at(steps_done + 1)``."""

    def __init__(self, optimizer, schedule: LRSchedule) -> None:
        self.optimizer = optimizer
        self.schedule = schedule
        self.num_steps = 0
        self._apply()

    def _apply(self) -> None:
        lr = self.schedule.lr_at(self.num_steps + 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def step(self, *args, **kwargs) -> None:  # DeepSpeed may pass an increment; one call is one step
        self.num_steps += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = int(state["num_steps"])
        self._apply()
