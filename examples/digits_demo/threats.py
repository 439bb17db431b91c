"""The demo's simulated attacks on the data supply chain: one contributor flips labels, one shard is tampered."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pandas as pd

from digits_demo.digits import LABEL, NUM_CLASSES, tar_bytes


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
    """Flips labels in place in each shard (parquet, or WebDataset tar), as a malicious contributor would before
    signing."""
    rng = np.random.default_rng(seed)
    for path in paths:
        if path.suffix == ".tar":
            _poison_tar(path, fraction, rng)
        else:
            flip_labels(pd.read_parquet(path), fraction, rng).to_parquet(path, index=False)


def _poison_tar(path: Path, fraction: float, rng: np.random.Generator) -> None:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, extension = member.name.partition(".")
            samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    frame = pd.DataFrame({LABEL: [int(members["cls"]) for members in samples.values()]})
    flipped = flip_labels(frame, fraction, rng)[LABEL].tolist()
    for members, label in zip(samples.values(), flipped, strict=True):
        members["cls"] = str(label).encode()
    path.write_bytes(tar_bytes(samples))


def tamper_file(path: Path, offset: int = -64) -> None:
    """Flips one byte of a file, as an attacker with write access to storage would after signing."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
