"""Clean calibration draws of the trusted rows: the two-level bootstrap (the pool resampled, then rows drawn with
replacement from the resample), per class when stratified, kept as row indices until fine-tuned."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import overload

import numpy as np
import torch
from typing_extensions import override

from trainguard.defenses.errors import ScreeningInputError
from trainguard.defenses.heldout import LabeledData
from trainguard.defenses.roni.config import DRAW_STREAM, SCALE_STREAM


class _LazyShards(Sequence[LabeledData]):
    """Shards made one at a time as they are read (`_shard`), so a chunk of them is in memory at once: thousands of
    large draws of frozen features would not fit together."""

    def __init__(self, length: int) -> None:
        self.length = length

    @override
    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, index: int) -> LabeledData: ...
    @overload
    def __getitem__(self, index: slice) -> list[LabeledData]: ...
    @override
    def __getitem__(self, index: int | slice) -> LabeledData | list[LabeledData]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._shard(index)

    @abstractmethod
    def _shard(self, index: int) -> LabeledData:
        """Shard `index`, made now."""


class _Draws(_LazyShards):
    """Calibration shards as row indices into the trusted data, materialised as they are read."""

    def __init__(self, trusted: LabeledData, rows: Sequence[np.ndarray] | np.ndarray) -> None:
        super().__init__(len(rows))
        self.trusted = trusted
        self.rows = rows

    @override
    def _shard(self, index: int) -> LabeledData:
        return self.trusted.take(torch.as_tensor(self.rows[index]))


def bootstrap_draws(
    pool_size: int, size: int, count: int, seed: int, stream: int = SCALE_STREAM, start: int = 0
) -> np.ndarray:
    """Row indices (count x size) of clean draws `start`, `start + 1`, ... of a stream: each resamples the pool,
    then draws `size` rows with replacement from that resample, so a draw varies like a fresh shard compared with
    the pool (both noises, see the package docstring)."""
    if pool_size < 1:
        raise ScreeningInputError("calibration needs trusted rows to draw from; the trusted data is empty")
    rng = np.random.default_rng([stream, size, seed, start])
    resampled = rng.integers(0, pool_size, size=(count, pool_size))
    return np.take_along_axis(resampled, rng.integers(0, pool_size, size=(count, size)), axis=1)


def stratified_draws(labels: np.ndarray, counts: Sequence[int], count: int, seed: int, start: int = 0) -> np.ndarray:
    """Row indices (count x sum(counts)) of clean draws holding `counts[c]` rows of class c: per class, the
    two-level bootstrap of the trusted rows of that class (a class they lack: of all trusted rows)."""
    parts = []
    for label, k in enumerate(counts):
        if k == 0:
            continue
        pool = np.flatnonzero(labels == label)
        pool = pool if pool.size else np.arange(len(labels))
        parts.append(pool[bootstrap_draws(pool.size, k, count, seed, DRAW_STREAM + 1 + label, start)])
    return np.concatenate(parts, axis=1)
