"""The embedded default data: scikit-learn's digits, scaled to [0, 1], as tensors or per-contributor shards
(parquet tables, or WebDataset tars of PNG images)."""

from __future__ import annotations

import io
import itertools
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from trainguard.files import atomic_write

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

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.int64]]:
        return zip(self.x, self.y, strict=True)

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
    """Writes one shard: parquet (64 float pixel columns and an int64 `label`), or, for a `.tar` path, a WebDataset
    tar of 8x8 grayscale PNG images with `.cls` labels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".tar":
        samples = {f"{i:06d}": {"png": png_bytes(x), "cls": str(int(y)).encode()} for i, (x, y) in enumerate(data)}
        atomic_write(path, tar_bytes(samples))
    else:
        data.to_frame().to_parquet(path, index=False)
    return path


def png_bytes(pixels: np.ndarray) -> bytes:
    """An 8x8 grayscale PNG of pixels in [0, 1]."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.round(pixels.reshape(IMAGE_SHAPE[1:]) * 255).astype(np.uint8), mode="L").save(out, "PNG")
    return out.getvalue()


def tar_bytes(samples: dict[str, dict[str, bytes]]) -> bytes:
    """A WebDataset tar (members `<key>.<ext>`, grouped by key, in order) with fixed metadata, so equal samples give
    equal bytes."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples.items():
            for extension, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()
