"""Writes the embedded default data set: digits split into parquet shards from several simulated contributors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.digits import load_digits_split, split, write_shard

DEFAULT_SOURCES = ("alice", "bob", "carol", "dave")


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

    def sources_map(self) -> dict[str, str]:
        """Shard name -> contributor id, as the signer's `--sources` map takes it."""
        return {shard.name: shard.source for shard in self.shards}


def prepare_digits(
    root: Path,
    sources: tuple[str, ...] = DEFAULT_SOURCES,
    shards_per_source: int = 4,
    shard_size: int = 50,
    holdout_size: int = 400,
    seed: int = 0,
) -> PreparedData:
    """Writes `holdout/holdout.parquet` (trusted, never trained on) and `train/<source>/shard-NN.parquet`."""
    data = load_digits_split(seed)
    train_sizes = [shard_size] * (len(sources) * shards_per_source)
    pieces = split(data, [holdout_size, *train_sizes])
    holdout, train_pieces = pieces[0], pieces[1:]
    written = [PreparedShard("holdout/holdout.parquet", "trusted", "holdout", len(holdout))]
    write_shard(holdout, root / "holdout" / "holdout.parquet")
    for index, piece in enumerate(train_pieces):
        source = sources[index // shards_per_source]
        name = f"train/{source}/shard-{index % shards_per_source:02d}.parquet"
        write_shard(piece, root / name)
        written.append(PreparedShard(name, source, "train", len(piece)))
    return PreparedData(root=root, shards=tuple(written))
