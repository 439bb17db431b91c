"""Writes the embedded default data set: digits as shards from a trusted curator and several contributors, as
parquet tables or as WebDataset tars of PNG images.

Layout under the data root: `trusted/base.<ext>` (trusted training data) and `trusted/holdout.<ext>` (the held-out
set, never trained on), signed by the curator; `train/<source>/b<batch>-shard-NN.<ext>` from each contributor.
Batches draw disjoint rows, so each retraining cycle can bring new shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from digits_demo.digits import DigitsSplit, load_digits_split, split, write_shard

DEFAULT_SOURCES = ("alice", "bob", "carol", "dave")
FORMATS = {"parquet": "parquet", "images": "tar"}
"""Shard format -> file extension: parquet tables, or WebDataset tars of 8x8 PNG digits."""
TRUSTED_SOURCE = "curator"


@dataclass(frozen=True)
class PreparedShard:
    """One written shard: its path relative to the data root, contributor and role (train or holdout)."""

    name: str
    source: str
    role: str
    records: int


@dataclass(frozen=True)
class PreparedData:
    root: Path
    shards: tuple[PreparedShard, ...]

    def contributed(self) -> dict[str, str]:
        """Contributed shard name (relative to `root/train`) -> contributor id, as `sign --sources` takes it."""
        return {
            shard.name.removeprefix("train/"): shard.source for shard in self.shards if shard.source != TRUSTED_SOURCE
        }


@dataclass(frozen=True)
class Layout:
    """How many rows go where; batches of contributed shards come after the trusted rows."""

    sources: tuple[str, ...] = DEFAULT_SOURCES
    shards_per_source: int = 3
    shard_size: int = 50
    holdout_size: int = 350
    base_size: int = 200

    @property
    def batch_rows(self) -> int:
        return len(self.sources) * self.shards_per_source * self.shard_size


def _contributed_batch(data: DigitsSplit, layout: Layout, batch: int) -> list[DigitsSplit]:
    start = layout.holdout_size + layout.base_size + batch * layout.batch_rows
    if start + layout.batch_rows > len(data):
        raise ValueError(f"batch {batch} needs rows up to {start + layout.batch_rows}; digits has {len(data)}")
    sizes = [start] + [layout.shard_size] * (len(layout.sources) * layout.shards_per_source)
    return split(data, sizes)[1:]


def prepare_digits(
    root: Path, layout: Layout = Layout(), batch: int = 0, seed: int = 0, shard_format: str = "parquet"
) -> PreparedData:
    """Writes the trusted shards and contributed batch `batch` in `shard_format` (see FORMATS); returns what it
    wrote."""
    extension = FORMATS[shard_format]
    data = load_digits_split(seed)
    holdout, base = split(data, [layout.holdout_size, layout.base_size])
    written = [
        PreparedShard(f"trusted/holdout.{extension}", TRUSTED_SOURCE, "holdout", len(holdout)),
        PreparedShard(f"trusted/base.{extension}", TRUSTED_SOURCE, "trusted", len(base)),
    ]
    write_shard(holdout, root / written[0].name)
    write_shard(base, root / written[1].name)
    for index, piece in enumerate(_contributed_batch(data, layout, batch)):
        source = layout.sources[index // layout.shards_per_source]
        name = f"train/{source}/b{batch}-shard-{index % layout.shards_per_source:02d}.{extension}"
        write_shard(piece, root / name)
        written.append(PreparedShard(name, source, "train", len(piece)))
    return PreparedData(root=root, shards=tuple(written))
