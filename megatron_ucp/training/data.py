"""Feeding samples to the pipeline engine.

The sample seen at a given iteration depends only on (seed, global sample index): a step that
starts at consumed-sample count ``c`` uses global samples ``[c, c + G)``. Micro step ``j`` of
data-parallel rank ``d`` takes ``mbs`` consecutive samples starting at ``c + (j * dp + d) * mbs``. Changing DP or the micro batch
only regroups the same G samples, so the optimizer sees the same batch at every layout.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np
import torch


class SampleSource(Protocol):
    def __getitem__(self, global_index: int) -> np.ndarray: ...


class MockDataset:
    """Deterministic pseudo-random tokens: sample g is a function of (seed, g) only."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int) -> None:
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.seed = seed

    def __getitem__(self, global_index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, global_index])
        return rng.integers(0, self.vocab_size, size=self.seq_length + 1, dtype=np.int64)


def sample_indices(step_start: int, micro_step: int, micro_batch: int, dp_rank: int, dp_size: int) -> list[int]:
    """Global sample indices of one micro batch of the step whose first sample is ``step_start``."""
    start = step_start + (micro_step * dp_size + dp_rank) * micro_batch
    return list(range(start, start + micro_batch))


def micro_batches(dataset: SampleSource, consumed_samples: int, num_steps: int | None,
                  global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                  device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, labels) micro batches of ``num_steps`` steps (forever if None) after ``consumed_samples``."""
    if global_batch % (micro_batch * dp_size):
        raise ValueError(f"global batch {global_batch} is not divisible by micro batch {micro_batch} x DP {dp_size}")
    micro_steps = global_batch // (micro_batch * dp_size)
    step = 0
    while num_steps is None or step < num_steps:
        step_start = consumed_samples + step * global_batch
        for j in range(micro_steps):
            idx = sample_indices(step_start, j, micro_batch, dp_rank, dp_size)
            batch = torch.from_numpy(np.stack([np.asarray(dataset[g], dtype=np.int64) for g in idx]))
            yield batch[:, :-1].contiguous().to(device), batch[:, 1:].contiguous().to(device)
        step += 1


def sequence_slices(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], sp: int,
                    sp_rank: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each (tokens, labels) micro batch cut to Ulysses rank ``sp_rank``'s slice of the sequence (of ``sp``)."""
    for tokens, labels in batches:
        if sp == 1:
            yield tokens, labels
            continue
        length = tokens.shape[1] // sp
        cut = slice(sp_rank * length, (sp_rank + 1) * length)
        yield tokens[:, cut].contiguous(), labels[:, cut].contiguous()
