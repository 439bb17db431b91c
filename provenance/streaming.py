"""A streaming dataset for shards too large to hold in memory: each DataLoader worker reads, verifies and decodes
only its own shards (split across DDP ranks, then across workers), so verification happens inside the workers.

Every read is journalled with the process that made it, and a refusal in a worker is journalled too, so the main
process keeps one exact read log and re-raises the worker's `ShardError` as it was (a worker's exception otherwise
crosses the process boundary as a multi-line text with its reason lost). Forked and spawned workers both work.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from typing_extensions import override

from trainguard.provenance.allowlist import AllowList
from trainguard.provenance.errors import ShardError
from trainguard.provenance.formats import Decoder, default_decoders
from trainguard.provenance.reader import (
    JournalLog,
    ReadLog,
    ShardReader,
    first_refusal,
    journal_records,
    journal_refusal,
)
from trainguard.provenance.verify import VerifiedManifest

Transform = Callable[[torch.Tensor], torch.Tensor]


class StreamingShards(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """(input, target) samples streamed from the selected shards of verified manifests, verified and decoded in the
    worker that reads each shard; shard order (and sample order within a shard) reshuffled every epoch."""

    def __init__(
        self,
        verified: Sequence[VerifiedManifest],
        *,
        roles: Sequence[str] = ("train", "trusted"),
        allow: AllowList | None = None,
        decoders: Mapping[str, Decoder] | None = None,
        label_column: str = "label",
        transform: Transform | None = None,
        shuffle: bool = True,
        seed: int = 0,
        journal_dir: Path | None = None,
    ) -> None:
        self.verified = tuple(verified)
        self.allow = allow
        self.decoders = default_decoders(decoders, label=label_column)
        self.transform, self.shuffle, self.seed, self.epoch = transform, shuffle, seed, 0
        self.shards = [
            (index, shard.name)
            for index, manifest in enumerate(self.verified)
            for shard in manifest.manifest.select(roles)
            if ShardReader(manifest, allow=allow).permitted(shard)
        ]
        folder = Path(tempfile.mkdtemp(prefix="trainguard-stream-", dir=journal_dir))
        self.journal = folder / "reads.jsonl"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def read_log(self) -> ReadLog:
        """Every verified read, by any process, in the order the journal got them."""
        return journal_records(self.journal)

    def refusal(self) -> ShardError | None:
        """The first refusal a worker journalled, as the ShardError it raised."""
        return first_refusal(self.journal)

    def own_shards(self) -> list[tuple[int, str]]:
        """This process's shards: the epoch's order, split by DDP rank, then by DataLoader worker."""
        order = list(self.shards)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
        rank, world = _rank()
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        return order[rank::world][worker_id::workers]

    @override
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        log = JournalLog(self.journal)
        for index, name in self.own_shards():
            reader = ShardReader(self.verified[index], log, self.allow)
            try:
                samples = reader.read_samples(name, self.decoders)
            except ShardError as error:
                journal_refusal(self.journal, error)
                raise
            inputs, targets = torch.as_tensor(samples.inputs, dtype=torch.float32), torch.as_tensor(samples.targets)
            order = torch.randperm(len(samples)) if self.shuffle else torch.arange(len(samples))
            for i in order.tolist():
                yield (self.transform(inputs[i]) if self.transform else inputs[i]), targets[i]


class StreamingLoader(DataLoader[tuple[torch.Tensor, torch.Tensor]]):
    """A DataLoader over `StreamingShards` that re-raises a worker's refusal as the ShardError it was."""

    @override
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # torch annotates its own iterator class
        try:
            yield from super().__iter__()
        except Exception:  # a worker's error arrives rebuilt from text: the journal holds the refusal as it was
            refusal = self.dataset.refusal()  # type: ignore[attr-defined]
            if refusal is None:
                raise
            raise refusal from None


def _rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
