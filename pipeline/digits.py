"""The embedded default data: scikit-learn's digits, scaled to [0, 1], as tensors or per-contributor parquet shards."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

FEATURES = tuple(f"pixel_{i:02d}" for i in range(64))
LABEL = "label"
IMAGE_SHAPE = (1, 8, 8)
NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitsSplit:
    """Features in [0, 1] (N x 64 float32) and integer labels (N,)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.x, columns=list(FEATURES))
        frame[LABEL] = self.y.astype(np.int64)
        return frame


def load_digits_split(seed: int = 0) -> DigitsSplit:
    """All 1,797 digits, shuffled with `seed`, pixels scaled from 0..16 to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(seed).permutation(len(bunch.target))
    x = (bunch.data[order] / 16.0).astype(np.float32)
    return DigitsSplit(x=x, y=bunch.target[order].astype(np.int64))


def split(data: DigitsSplit, sizes: list[int]) -> list[DigitsSplit]:
    """Consecutive, disjoint pieces of `data` with the given sizes (the rest is dropped)."""
    if sum(sizes) > len(data):
        raise ValueError(f"asked for {sum(sizes)} rows, have {len(data)}")
    bounds = np.cumsum([0, *sizes])
    return [DigitsSplit(data.x[a:b], data.y[a:b]) for a, b in itertools.pairwise(bounds)]


def write_shard(data: DigitsSplit, path: Path) -> Path:
    """Writes one parquet shard (64 float pixel columns and an int64 `label`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data.to_frame().to_parquet(path, index=False)
    return path
