"""A torch Dataset and a LightningDataModule over signed manifests: only listed shards, each verified on read.

Tables (parquet, 2-D npy) give rows of numeric feature columns and an integer label column; any other format is
decoded from the shard's verified bytes by a `Decoder` (`trainguard.provenance.formats`), and samples keep their
shape (images (C, H, W), tensors), optionally through a per-sample transform. The read log of every shard actually
read (manifest, dataset, name, sha256, in order) is exact, and its digest can go into an attestation.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override

from trainguard.provenance.allowlist import AllowedShard, AllowList, RefusedRead
from trainguard.provenance.errors import MalformedError, ProvenanceError, ShardError, ShardFormatError, shard_error
from trainguard.provenance.formats import Decoder, Samples, decoding, default_decoders
from trainguard.provenance.manifest import ShardEntry
from trainguard.provenance.manifest_ref import ManifestLike, as_ref
from trainguard.provenance.policy import TrustPolicy
from trainguard.provenance.reader import ReadLog, ReadRecord, ShardReader
from trainguard.provenance.rollback import RollbackState
from trainguard.provenance.verify import VerifiedManifest, open_manifest
from trainguard.ranks import gather_json


def open_verified(
    refs: Iterable[ManifestLike], trust: TrustPolicy | Path | None, state: RollbackState | Path | None = None
) -> tuple[VerifiedManifest, ...]:
    """Each manifest checked for signatures, payload type, expiry and rollback (shards are checked on read)."""
    opened = []
    for ref in map(as_ref, refs):
        policy = ref.trust or trust
        if policy is None:
            raise MalformedError(f"no trust policy for manifest {ref.manifest}")
        opened.append(open_manifest(ref.manifest, policy, dataset=ref.dataset, data_dir=ref.data_dir, state=state))
    return tuple(opened)


TABLE_SUFFIXES = (".parquet", ".npy")
Transform = Callable[[torch.Tensor], torch.Tensor]
Sample = tuple[torch.Tensor, torch.Tensor]


class ShardDataset(Dataset[Sample]):
    """The samples of the selected shards as (float32 input of the shard's shape, target), held in memory after a
    verified read; tables through their feature and label columns, other formats through `decoders`. `exclude_rows`
    (`dataset:name` -> row indices) drops rows of a shard after its verified read, e.g. rows a detector quarantined:
    the shard is still read and logged whole, so its digest is checked, but those rows are never served.

    A shard whose role is in `refusable` and whose read fails is refused by name (in `refused`) and left out, as
    the cycle's intake refuses a training shard: that intake read the same signed bytes, so a failure now means the
    file changed after it. A failed read of any other shard raises.

    Every selected shard is read (and verified) when the dataset is built.

    Args:
        readers: One `ShardReader` per verified manifest; shards a reader's allow-list does not permit are skipped.
        roles: The shard roles selected (None: any).
        sources: The sources selected (None: any).
        exclude: Shards left out, by `name` or `dataset:name`.
        exclude_rows: `dataset:name` (or `<key set>/dataset:name`, one signer's) -> row indices never served.
        feature_columns: The table columns read as features (None: all but the target columns).
        label_column: The target column (integer labels stay int64, real values become float32), or several
            target columns read as one (N, k) float32 target.
        decoders: Suffix -> decoder for formats other than tables; laid over the built-in ones, and a decoder for
            `.parquet` or `.npy` reads those shards instead of the table path.
        transform: A per-sample callable applied to each input as it is served.
        part: `(rank, world)`: only this rank's part of the selected shards, balanced by signed record counts.
        refusable: Roles whose shards are refused by name (in `refused`) when their read fails, instead of raising.

    Raises:
        ShardError: A selected shard's read or decoding failed and its role is not `refusable`.
        MalformedError: The shards cannot form one dataset (inputs of different shapes), or a row to exclude lies
            outside its shard.

    Example::

        from pathlib import Path
        from trainguard import ShardDataset, ShardReader
        from trainguard.provenance import open_manifest

        verified = open_manifest(Path("data/train.manifest.json"), Path("trust.yaml"), dataset="digits-contributed")
        dataset = ShardDataset([ShardReader(verified)], roles=("train",), exclude=("bob/part-2.parquet",))
        x, y = dataset[0]
    """

    def __init__(
        self,
        readers: Sequence[ShardReader],
        *,
        roles: Collection[str] | None = ("train",),
        sources: Collection[str] | None = None,
        exclude: Collection[str] = (),
        exclude_rows: Mapping[str, Collection[int]] | None = None,
        feature_columns: Sequence[str] | None = None,
        label_column: str | Sequence[str] = "label",
        decoders: Mapping[str, Decoder] | None = None,
        transform: Transform | None = None,
        part: tuple[int, int] | None = None,
        refusable: Collection[str] = (),
    ) -> None:
        chosen = [
            (reader, s)
            for reader in readers
            for s in reader.verified.manifest.select(roles, sources)
            if s.name not in exclude
            and f"{reader.verified.manifest.dataset}:{s.name}" not in exclude
            and reader.permitted(s)
        ]
        if part is not None:
            rank, world = part
            owners = balanced_owners([s.records if s.records is not None else s.size for _, s in chosen], world)
            chosen = [pick for pick, owner in zip(chosen, owners, strict=True) if owner == rank]
        every_decoder = default_decoders(decoders, label=label_column if isinstance(label_column, str) else "label")
        parts: list[Samples] = []
        shards: list[tuple[str, str, ShardEntry]] = []
        refused: list[RefusedRead] = []
        for reader in readers:
            dataset = reader.verified.manifest.dataset
            signed_by = reader.verified.key_set.namespace
            selected = [s for r, s in chosen if r is reader]
            tables = {s.name: s for s in selected if read_as_table(s.name, decoders)}
            for name, frame in _frames(reader, tables, refusable, refused):
                parts.append(table_samples(name, frame, feature_columns, label_column))
                shards.append((signed_by, dataset, tables[name]))
            for shard in (s for s in selected if s.name not in tables):
                try:
                    parts.append(reader.read_samples(shard.name, every_decoder))
                except ShardError as error:
                    refused.append(_refused(reader, shard, error, refusable))
                    continue
                shards.append((signed_by, dataset, shard))
        self.refused = tuple(refused)
        dropped = exclude_rows or {}
        parts = [
            _without_rows(p, dropped.get(f"{k}/{d}:{s.name}", dropped.get(f"{d}:{s.name}", ())))
            for p, (k, d, s) in zip(parts, shards, strict=True)
        ]
        self.shards = tuple((d, s) for _, d, s in shards)
        self.row_shard = np.repeat(np.arange(len(parts)), [len(p) for p in parts]).astype(np.int64)
        empty = Samples(np.zeros((0, len(feature_columns or ())), np.float32), np.zeros(0, np.int64))
        try:
            merged = Samples.concat(parts) if parts else empty
        except ValueError as error:
            raise MalformedError(f"the selected shards cannot form one dataset: {error}") from None
        self.features = torch.from_numpy(np.ascontiguousarray(merged.inputs, dtype=np.float32))
        self.labels = torch.from_numpy(np.ascontiguousarray(merged.targets))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    @override
    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features[index]
        return (self.transform(features) if self.transform is not None else features), self.labels[index]


def _without_rows(samples: Samples, rows: Collection[int]) -> Samples:
    if not rows:
        return samples
    keep = np.ones(len(samples), dtype=bool)
    drop = np.fromiter(rows, dtype=np.int64)
    if drop.min() < 0 or drop.max() >= len(samples):
        raise MalformedError(f"rows to exclude {sorted(rows)[:3]}... lie outside a shard of {len(samples)} rows")
    keep[drop] = False
    return Samples(samples.inputs[keep], samples.targets[keep])


def _frames(
    reader: ShardReader, tables: Mapping[str, ShardEntry], refusable: Collection[str], refused: list[RefusedRead]
) -> Iterator[tuple[str, pd.DataFrame]]:
    """The tables read in order (the next one read ahead while one is parsed); a refusable shard that fails is
    added to `refused` and the reading goes on after it."""
    names = list(tables)
    done = 0
    while done < len(names):
        try:
            for item in reader.frames(names[done:]):
                done += 1
                yield item
        except ShardError as error:  # the reading fails on the shard it was about to yield
            refused.append(_refused(reader, tables[names[done]], error, refusable))
            done += 1


def _refused(reader: ShardReader, shard: ShardEntry, error: ShardError, refusable: Collection[str]) -> RefusedRead:
    """The refusal of `shard` whose read raised `error`; raised again when its role may not be refused."""
    if shard.role not in refusable:
        raise error
    verified = reader.verified
    allowed = AllowedShard(verified.manifest_sha256, verified.manifest.dataset, shard.name, shard.sha256)
    detail = f"shard {allowed.key}: changed after intake ({error.reason}): {' '.join(str(error).split())}"
    return RefusedRead(allowed, error.reason, detail)


def _rank_reads(document: Any, rank: int) -> tuple[list[ReadRecord], list[RefusedRead]]:
    """Rank `rank`'s reads and refusals from the JSON it sent; anything else is refused in one line."""
    names = [f.name for f in fields(ReadRecord)]
    if not isinstance(document, dict) or sorted(document) != ["reads", "refused"]:
        raise MalformedError(f"rank {rank}'s read log: expected an object with reads and refused")
    reads = document["reads"]
    if not isinstance(reads, list) or not all(isinstance(r, dict) and sorted(r) == sorted(names) for r in reads):
        raise MalformedError(f"rank {rank}'s read log: every read must have exactly {names}")
    if not all(type(r["size"]) is int and all(isinstance(r[n], str) for n in names if n != "size") for r in reads):
        raise MalformedError(f"rank {rank}'s read log: a read's fields have the wrong types")
    refused = document["refused"]
    if not isinstance(refused, list):
        raise MalformedError(f"rank {rank}'s read log: refused must be a list")
    where = f"rank {rank}'s refused read"
    return [ReadRecord(**r) for r in reads], [RefusedRead.from_json(r, where) for r in refused]


def _nothing_to_train(refused: Sequence[RefusedRead], ranked: bool) -> None:
    """Raises why no training row was read: every shard refused at read, or none selected (on this rank)."""
    where = " of this rank" if ranked else ""
    if refused:
        first = refused[0]
        message = f"every training shard{where} was refused at read; first: {first.detail}"
        raise shard_error(first.reason, message, shard=first.shard.key)
    raise MalformedError(
        "no shard of the manifests matches the training selection (roles, sources, exclude)"
        + (" on this rank: fewer shards than ranks" if ranked else "")
    )


def balanced_owners(weights: Sequence[int], parts: int) -> list[int]:
    """The part (0 .. parts-1) each item goes to: heaviest first to the lightest part so far, ties to the lower
    part, so every rank computes the same split and the parts' total weights stay close."""
    totals = [0] * parts
    owners = [0] * len(weights)
    for index in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        owner = min(range(parts), key=lambda p: (totals[p], p))
        owners[index] = owner
        totals[owner] += weights[index]
    return owners


class RankPartSampler(DistributedSampler[int]):
    """The indices of this rank's own part of the data, padded by repeats to `length` so that every rank runs the
    same number of batches; a sampler of one replica, so Lightning does not split the part again."""

    def __init__(self, dataset: ShardDataset, length: int, *, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=seed)
        self.part = dataset
        self.length = length

    @override
    def __iter__(self) -> Iterator[int]:
        size = len(self.part)
        if self.shuffle:
            order = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(size)
        return iter(order.repeat(-(-self.length // max(size, 1)))[: self.length].tolist())

    @override
    def __len__(self) -> int:
        return self.length


def read_as_table(name: str, decoders: Mapping[str, Decoder] | None) -> bool:
    """Whether a shard is read as a table (feature and label columns): a table suffix no caller decoder claims."""
    return name.endswith(TABLE_SUFFIXES) and not any(name.endswith(suffix) for suffix in decoders or {})


def table_samples(
    name: str, frame: pd.DataFrame, feature_columns: Sequence[str] | None, label_column: str | Sequence[str]
) -> Samples:
    """A table's rows as samples: float32 feature columns (all but the target columns by default); targets from
    `label_column`, integer labels (N,) kept int64 and real values float32, or from several target columns
    (N, k) float32 (regression outputs, multi-label 0/1 vectors)."""
    with decoding(name):
        return Samples(*_columns(name, frame, feature_columns, label_column))


def _columns(
    name: str, frame: pd.DataFrame, feature_columns: Sequence[str] | None, label_column: str | Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    targets_named = [label_column] if isinstance(label_column, str) else list(label_column)
    absent = [c for c in targets_named if c not in frame.columns]
    if absent:
        what = "label column" if isinstance(label_column, str) else "target columns"
        shown = repr(absent[0]) if isinstance(label_column, str) else str(absent[:3])
        raise ShardFormatError(f"shard {name}: no {what} {shown}", shard=name)
    columns = list(feature_columns) if feature_columns else [c for c in frame.columns if c not in targets_named]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ShardFormatError(f"shard {name}: missing feature columns {missing[:3]}", shard=name)
    table = frame[columns]
    if not all(pd.api.types.is_numeric_dtype(t) for t in table.dtypes):
        raise ShardFormatError(f"shard {name}: feature columns must be numeric", shard=name)
    kinds = [frame[c].dtype for c in targets_named]
    if not all(pd.api.types.is_numeric_dtype(k) and not pd.api.types.is_bool_dtype(k) for k in kinds):
        raise ShardFormatError(f"shard {name}: targets {targets_named[:3]} must be numeric", shard=name)
    # Arrow-backed columns come out read-only; torch must not wrap a buffer it may not write (copied only then)
    inputs = table.to_numpy(np.float32)
    if not isinstance(label_column, str):
        targets = frame[targets_named].to_numpy(np.float32)
    elif pd.api.types.is_integer_dtype(kinds[0]):
        targets = frame[label_column].to_numpy(np.int64)
    else:
        targets = frame[label_column].to_numpy(np.float32)
    return np.require(inputs, requirements="W"), np.require(targets, requirements="W")


class VerifiedDataModule(pl.LightningDataModule):
    """Train on role `train` and `trusted` shards and validate on role `holdout` shards of signed manifests,
    verified on read. `decoders` (suffix -> `decode(name, data) -> Samples`) read formats other than tables;
    `transform`/`val_transform` are per-sample callables (torchvision-style) applied as batches are drawn.

    `exclude` drops shards by name (or `dataset:name`), e.g. those a poisoning screen rejected, and `exclude_rows`
    single rows of shards (`dataset:name`, or `<key set>/dataset:name` for one signer's -> row indices), e.g. those a
    row-level detector quarantined. A module made by
    `from_verified` reads through manifests already verified and an allow-list, never re-opening a manifest by path.
    Under DDP each rank reads only its own part of the training shards (balanced by signed record counts; held-out
    shards are read by every rank, which Lightning's sampler splits) and `read_log` merges every rank's reads into
    one exact log of the shards read, the same on every rank (ranks exchange them as JSON, never pickled).

    With `refuse_changed`, a role-`train` shard whose read fails (its file changed after the intake that chose it)
    is refused by name and training goes on without it; `refused` lists them, merged across ranks like the read
    log. Trusted and held-out shards still stop the fit, as does any shard without it.

    Manifests are opened (signatures, expiry, rollback) and shards read in `setup`, not in the constructor.

    Args:
        manifests: Manifest paths, `ManifestRef`s or mappings with `manifest` (and optional `dataset`,
            `data_dir`, `trust`).
        trust: The trust policy (or `.pub` key) for manifests that name none of their own.
        state_file: The rollback state the manifests are checked against (None: `default_state_path()`); checked
            only, never recorded.
        train_roles: The shard roles trained on.
        val_roles: The shard roles validated on (None or empty: no validation loader).
        sources: The sources selected (None: any).
        exclude: Shards left out, by `name` or `dataset:name`.
        exclude_rows: `dataset:name` (or `<key set>/dataset:name`) -> row indices of training shards never served.
        feature_columns: The table columns read as features (None: all but the target columns).
        label_column: The target column, or several target columns read as one (N, k) float32 target.
        decoders: Suffix -> `decode(name, data) -> Samples` for formats other than tables.
        transform: A per-sample callable applied to training inputs.
        val_transform: A per-sample callable applied to validation inputs.
        batch_size: Rows per batch of both loaders.
        num_workers: DataLoader worker processes.
        seed: Seeds the training loader's shuffle.
        refuse_changed: Whether a role-`train` shard whose read fails is refused (see above) instead of raising.

    Raises:
        MalformedError: A manifest entry without `manifest` or with unknown keys; at setup, a manifest without a
            trust policy, or no training shard selected.
        ProvenanceError: At setup, a manifest that does not verify or a shard read that fails (its subclass says
            which), or a failure on another rank.

    Example::

        from pytorch_lightning import Trainer
        from trainguard import VerifiedDataModule

        data = VerifiedDataModule(
            [{"manifest": "data/train.manifest.json", "dataset": "digits-contributed"}],
            trust="configs/digits-trust.yaml",
            exclude={"digits-contributed:bob/part-2.parquet"},
            batch_size=128,
        )
        Trainer(max_epochs=5).fit(model, datamodule=data)
        print(data.read_log.digest())  # the exact shards read, for an attestation
    """

    def __init__(
        self,
        manifests: Sequence[ManifestLike],
        trust: Path | str | None = None,
        *,
        state_file: Path | str | None = None,
        train_roles: Sequence[str] = ("train", "trusted"),
        val_roles: Sequence[str] | None = ("holdout",),
        sources: Sequence[str] | None = None,
        exclude: Collection[str] = (),
        exclude_rows: Mapping[str, Collection[int]] | None = None,
        feature_columns: Sequence[str] | None = None,
        label_column: str | Sequence[str] = "label",
        decoders: Mapping[str, Decoder] | None = None,
        transform: Transform | None = None,
        val_transform: Transform | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        refuse_changed: bool = False,
    ) -> None:
        super().__init__()
        self.refs = tuple(as_ref(m) for m in manifests)
        self.trust = Path(trust) if trust is not None else None
        self.state_file = Path(state_file) if state_file is not None else None
        self.train_roles, self.val_roles = tuple(train_roles), None if val_roles is None else tuple(val_roles)
        self.sources = None if sources is None else tuple(sources)
        self.exclude = frozenset(exclude)
        self.exclude_rows = {key: frozenset(rows) for key, rows in (exclude_rows or {}).items()}
        self.feature_columns, self.label_column = feature_columns, label_column
        self.decoders = dict(decoders or {})
        self.transform, self.val_transform = transform, val_transform
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.refusable = ("train",) if refuse_changed else ()
        self.read_log = self.local_read_log = ReadLog()
        self.refused: tuple[RefusedRead, ...] = ()
        self.verified: tuple[VerifiedManifest, ...] = ()
        self.allow: AllowList | None = None
        self.train_set: ShardDataset | None = None
        self.val_set: ShardDataset | None = None

    @classmethod
    def from_verified(
        cls, verified: Sequence[VerifiedManifest], allow: AllowList, **options: Any
    ) -> VerifiedDataModule:
        """A module over statements already verified (e.g. a cycle's intake) that reads only the shards on `allow`,
        each checked against its digest as it is read."""
        module = cls((), **options)
        module.verified, module.allow = tuple(verified), allow
        return module

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        try:
            train_set = self._read()
        except ProvenanceError:
            self.train_set = self.val_set = None
            self._agree(False)
            raise
        self._agree(True)
        self.read_log, self.refused = self._merged(self.local_read_log, train_set.refused)
        self._train_length = self._longest(len(train_set))

    def _part(self) -> tuple[int, int] | None:
        """(rank, world size) when this rank reads a part of the shards, None when it reads them all."""
        if self.trainer is None or self.trainer.world_size < 2:
            return None
        return self.trainer.global_rank, self.trainer.world_size

    def _merged(self, local: ReadLog, refused: tuple[RefusedRead, ...]) -> tuple[ReadLog, tuple[RefusedRead, ...]]:
        """Every rank's reads in rank order, each shard once, and every rank's refusals (this rank's own when it
        reads everything); the ranks exchange them as JSON."""
        if self._part() is None:
            return local, refused
        mine = {"reads": [vars(r) for r in local.records], "refused": [r.to_json() for r in refused]}
        ranks = [_rank_reads(document, rank) for rank, document in enumerate(gather_json(mine))]
        merged = ReadLog()
        for record in dict.fromkeys(r for reads, _ in ranks for r in reads):
            merged.append(record)
        return merged, tuple(dict.fromkeys(r for _, refusals in ranks for r in refusals))

    def _longest(self, length: int) -> int:
        """The largest of every rank's part sizes, so each pads its part to the same number of batches."""
        if self._part() is None:
            return length
        size = torch.tensor(length)
        torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MAX)
        return int(size)

    def _agree(self, ok: bool) -> None:
        """Under DDP every rank learns whether all ranks read their shards: a failure on one stops all of them
        (rather than leaving the others blocked in the next collective)."""
        if self.trainer is not None and not self.trainer.strategy.reduce_boolean_decision(ok, all=True) and ok:
            raise ProvenanceError("shard verification failed on another rank; training stopped")

    def _read(self) -> ShardDataset:
        """Reads the training (and validation) shards into `train_set` (and `val_set`); returns `train_set`."""
        if self.allow is None:
            self.verified = open_verified(self.refs, self.trust, self.state_file)
        readers = [ShardReader(v, self.local_read_log, self.allow) for v in self.verified]
        dataset = partial(
            ShardDataset,
            readers,
            sources=self.sources,
            exclude=self.exclude,
            feature_columns=self.feature_columns,
            label_column=self.label_column,
            decoders=self.decoders,
        )
        part = self._part()
        self.train_set = dataset(
            roles=self.train_roles,
            transform=self.transform,
            part=part,
            exclude_rows=self.exclude_rows,
            refusable=self.refusable,
        )
        if len(self.train_set) == 0:
            _nothing_to_train(self.train_set.refused, part is not None)
        if self.val_roles:
            self.val_set = dataset(roles=self.val_roles, transform=self.val_transform)
        return self.train_set

    def read_log_digest(self) -> str:
        return self.read_log.digest()

    @override
    def train_dataloader(self) -> DataLoader[Sample]:
        assert self.train_set is not None, "setup() first"
        if self._part() is not None:
            sampler = RankPartSampler(self.train_set, self._train_length, shuffle=True, seed=self.seed)
            return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator, num_workers=self.num_workers
        )

    @override
    def val_dataloader(self) -> DataLoader[Sample] | list[DataLoader[Sample]]:
        if self.val_set is None or len(self.val_set) == 0:
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)
