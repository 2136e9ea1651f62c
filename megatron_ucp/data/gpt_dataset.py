"""GPT pre-training samples from an indexed dataset, as a pure function of (seed, index).

Contract of ``GPTDataset(prefix, seq_length, seed, split, name)``:

1. **Split.**  ``split`` holds Megatron ``--split`` weights (``"969,30,1"``; ``,`` or ``/``
   separated; missing entries are 0) over the *documents* (sequences) of the dataset.
   Train, valid and test are contiguous document ranges in that order, with Megatron's
   rounding, and together cover every document exactly once (:func:`split_ranges`).
2. **Windows.**  The split's documents, in order, form ONE token stream (EODs from
   preprocessing included).  Window ``w`` is ``stream[w*L : w*L + L + 1]`` with
   ``L = seq_length``: windows overlap by one token so that labels are the inputs shifted
   by one, and the last partial window is dropped.  ``windows_in_epoch`` is their number
   (``(tokens - 1) // L``); zero windows is an error.
3. **Order.**  Global sample ``g >= 0`` is in epoch ``e = g // windows_in_epoch`` and is
   window ``perm_e[g % windows_in_epoch]`` where
   ``perm_e = np.random.default_rng([seed, e]).permutation(windows_in_epoch)``.
   So ``dataset[g]`` depends only on the files, ``seq_length``, ``split``, ``name``, ``seed``
   and ``g`` -- not on worker count, batch size, data-parallel layout or resume point, which
   is what lets a run resumed from a (universal) checkpoint see exactly the same data.
   There is no upper bound on ``g``: every epoch is a fresh permutation.
4. **Result.**  ``dataset[g]`` is a new ``np.int64`` array of ``seq_length + 1`` tokens,
   read through the memmap (the corpus is never loaded whole).

``len(dataset)`` is one epoch (``windows_in_epoch``) and iterating yields one epoch, so
generic code that loops over a dataset terminates; trainers should index by global sample.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from megatron_ucp.data.indexed_dataset import IndexedDataset

__all__ = ["GPTDataset", "SPLIT_NAMES", "parse_split", "split_ranges"]

SPLIT_NAMES = ("train", "valid", "test")
_PERMUTATION_CACHE = 4  # epochs whose permutation is kept; consecutive samples share one


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` -> three non-negative weights (padded with 0, normalized to sum 1)."""
    try:
        weights = [float(s) for s in re.split(r"[,/]", split.strip()) if s.strip()]
    except ValueError:
        raise ValueError(f"bad split {split!r}: expected up to 3 numbers like '969,30,1'") from None
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"bad split {split!r}: need 1-3 non-negative weights with a positive sum")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """Document ranges ``[(begin, end)]`` for train, valid, test; they tile ``[0, num_documents)``.

    Megatron's rule: round each part's size, accumulate, then shift the boundaries by the
    rounding surplus so that the last one lands on ``num_documents``.  Megatron can produce
    a negative boundary in degenerate cases (e.g. ``"0,1,1"`` over 3 documents); here the
    boundaries are additionally clamped to stay within range and non-decreasing.
    """
    weights = parse_split(split)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * num_documents)))
    surplus = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - surplus for b in bounds[1:]]
    for i in range(1, 4):
        bounds[i] = min(max(bounds[i], bounds[i - 1]), num_documents)
    assert bounds[0] == 0 and bounds[3] == num_documents, bounds
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


class GPTDataset:
    """Fixed-length, shuffled token windows over one split of an indexed dataset.

    See the module docstring for the exact contract.  Attributes: ``indexed`` (the
    :class:`IndexedDataset`), ``document_range`` and ``token_range`` of the split, and
    ``windows_in_epoch``.
    """

    def __init__(
        self,
        prefix: str | os.PathLike,
        seq_length: int,
        seed: int,
        split: str = "969,30,1",
        name: str = "train",
    ) -> None:
        if name not in SPLIT_NAMES:
            raise ValueError(f"split name must be one of {SPLIT_NAMES}, got {name!r}")
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy SeedSequence), got {seed}")
        self.prefix = str(prefix)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.split = split
        self.name = name
        self.indexed = IndexedDataset(self.prefix)
        self.document_range = split_ranges(split, len(self.indexed))[SPLIT_NAMES.index(name)]
        # Sequences are stored back to back, so a document range is one slice of the .bin.
        self.token_range = self.indexed.token_span(*self.document_range)
        num_tokens = self.token_range[1] - self.token_range[0]
        self.windows_in_epoch = max(num_tokens - 1, 0) // self.seq_length
        if self.windows_in_epoch == 0:
            raise ValueError(
                f"{self.prefix}: split {split!r} {name!r} (documents {self.document_range}) has"
                f" {num_tokens} tokens, too few for one window of seq_length+1 = {self.seq_length + 1}"
            )
        self._permutations: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def num_windows(self) -> int:
        """Alias of ``windows_in_epoch``."""
        return self.windows_in_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        """The window order of ``epoch`` (cached for the last few epochs used)."""
        perm = self._permutations.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.windows_in_epoch)
            self._permutations[epoch] = perm
            if len(self._permutations) > _PERMUTATION_CACHE:
                self._permutations.popitem(last=False)
        else:
            self._permutations.move_to_end(epoch)
        return perm

    def window(self, w: int) -> np.ndarray:
        """Window ``w`` of the split's token stream, unshuffled, as int64."""
        if not 0 <= w < self.windows_in_epoch:
            raise IndexError(f"window {w} out of range ({self.windows_in_epoch} windows)")
        start = self.token_range[0] + w * self.seq_length
        return np.array(self.indexed.tokens[start : start + self.seq_length + 1], dtype=np.int64)

    def __getitem__(self, g: int) -> np.ndarray:
        g = int(g)  # accepts numpy/torch integer scalars
        if g < 0:
            raise IndexError(f"global sample index must be >= 0, got {g}")
        epoch, i = divmod(g, self.windows_in_epoch)
        return self.window(int(self.permutation(epoch)[i]))

    def __len__(self) -> int:
        return self.windows_in_epoch

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[g] for g in range(self.windows_in_epoch))

    def __getstate__(self) -> dict:  # drop the permutation cache when sent to workers
        state = self.__dict__.copy()
        state["_permutations"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return (
            f"GPTDataset({self.prefix!r}, seq_length={self.seq_length}, seed={self.seed},"
            f" split={self.split!r}, name={self.name!r}, windows_in_epoch={self.windows_in_epoch})"
        )
