"""The demo's simulated attacks on the data supply chain: one contributor flips labels, one shard is tampered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from trainguard.pipeline.digits import LABEL, NUM_CLASSES


def flip_labels(frame: pd.DataFrame, fraction: float, rng: np.random.Generator) -> pd.DataFrame:
    """A copy of `frame` with `fraction` of its rows relabelled to a different, random class."""
    poisoned = frame.copy()
    count = round(fraction * len(frame))
    rows = rng.choice(len(frame), size=count, replace=False)
    shift = rng.integers(1, NUM_CLASSES, size=count)
    labels = poisoned[LABEL].to_numpy().copy()
    labels[rows] = (labels[rows] + shift) % NUM_CLASSES
    poisoned[LABEL] = labels
    return poisoned


def poison_shards(paths: list[Path], fraction: float, seed: int = 0) -> None:
    """Flips labels in place in each parquet shard, as a malicious contributor would before signing."""
    rng = np.random.default_rng(seed)
    for path in paths:
        flip_labels(pd.read_parquet(path), fraction, rng).to_parquet(path, index=False)


def tamper_file(path: Path, offset: int = -64) -> None:
    """Flips one byte of a file, as an attacker with write access to storage would after signing."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
