"""Verify-on-read: a shard's bytes are read once, hashed, and parsed from that same buffer only if the digest
matches, so nothing can change between check and use. Every verified read is appended to an exact read log.

Decoding is bounded and lives in `trainguard.provenance.formats` (headers are checked against the signed `records`
and the reader's `DecodeBound` before any data is decoded); the reader hands each decoder the verified bytes only,
and its callers a read-only file object over them where their own code wants a file. Whatever a decoder raises
reaches the caller as a ShardError naming the shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from trainguard.lazy import lazy_getattr
from trainguard.provenance.errors import (
    AppendedShardError,
    ChunkMismatchError,
    DigestMismatchError,
    DuplicateShardError,
    NotAllowedError,
    ShardError,
    ShardFormatError,
    TruncatedShardError,
    UnlistedShardError,
    UnsafePathError,
    shard_error,
)
from trainguard.provenance.formats import (
    DECODE_LIMIT,
    DECODE_RATIO,
    DEFAULT_BOUND,
    BoundedDecoder,
    DecodeBound,
    Decoder,
    Samples,
    check_decode,
    decoder_for,
    decoding,
)
from trainguard.provenance.hashing import open_regular
from trainguard.provenance.manifest import ShardEntry
from trainguard.provenance.paths import entry_problem, name_problem
from trainguard.provenance.verify import VerifiedManifest

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from trainguard.provenance.allowlist import AllowList

# The parsers moved to the format modules; they stay importable from here, loaded (with numpy and pyarrow) on use.
__getattr__ = lazy_getattr(
    __name__,
    {"parse_array": "trainguard.provenance.formats.arrays", "parse_frame": "trainguard.provenance.formats.tables"},
)
__all__ = [
    "DECODE_LIMIT",
    "DECODE_RATIO",
    "DecodeBound",
    "ReadLog",
    "ReadRecord",
    "ShardReader",
    "VerifiedFile",
]


@dataclass(frozen=True)
class ReadRecord:
    """One verified read: the shard, its content digest and size, and the digest of the manifest that listed it.

    Attributes:
        manifest_sha256: SHA-256 of the manifest file that listed the shard.
        dataset: The manifest's dataset name.
        name: The shard's name in the manifest.
        sha256: The shard's whole-file SHA-256 (the signed one, which its bytes matched).
        size: The shard's size in bytes.
    """

    manifest_sha256: str
    dataset: str
    name: str
    sha256: str
    size: int


class ReadLog:
    """The shards actually read, in order (thread-safe); its digest goes into the model attestation.

    It takes no arguments: a `ShardReader` appends a `ReadRecord` for each verified read, and `records`,
    `to_json_lines()` and `digest()` give them back.
    """

    def __init__(self) -> None:
        self._records: list[ReadRecord] = []
        self._lock = threading.Lock()

    def append(self, record: ReadRecord) -> None:
        with self._lock:
            self._records.append(record)

    @property
    def records(self) -> tuple[ReadRecord, ...]:
        with self._lock:
            return tuple(self._records)

    def to_json_lines(self) -> bytes:
        """One canonical JSON object per read, in read order."""
        lines = [json.dumps(vars(r), sort_keys=True, separators=(",", ":")) for r in self.records]
        return "".join(line + "\n" for line in lines).encode()

    def digest(self) -> str:
        """SHA-256 of `to_json_lines()`."""
        return hashlib.sha256(self.to_json_lines()).hexdigest()


COPY_BLOCK = 8 * 1024 * 1024
"""Bytes read, hashed and written at a time when a chunk is copied into the private cache."""


class JournalLog(ReadLog):
    """A ReadLog that also appends each record, with the reading process's id, as one JSON line in one `write` to a
    journal file shared by a DataLoader's worker processes, so the main process can collect every worker's reads
    (`journal_records`)."""

    def __init__(self, journal: Path) -> None:
        super().__init__()
        self.journal = journal

    @override
    def append(self, record: ReadRecord) -> None:
        super().append(record)
        journal_entry(self.journal, {"read": vars(record), "pid": os.getpid()})


def journal_entry(path: Path, entry: dict[str, object]) -> None:
    """Appends one JSON line to a journal in a single `write` (atomic for lines this short with O_APPEND)."""
    line = (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def journal_entries(path: Path) -> list[dict[str, Any]]:
    """Every entry of a journal, in the order written (none when nothing was written yet)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


def journal_records(path: Path) -> ReadLog:
    """The reads a journal holds, as one ReadLog."""
    log = ReadLog()
    for entry in journal_entries(path):
        if "read" in entry:
            log.append(ReadRecord(**entry["read"]))
    return log


def journal_refusal(path: Path, error: ShardError) -> None:
    """Journals a refusal, so the main process can raise it as it was (a worker's exception reaches it as text)."""
    refusal = {"shard": error.shard, "reason": error.reason, "message": str(error)}
    journal_entry(path, {"refusal": refusal, "pid": os.getpid()})


def first_refusal(path: Path) -> ShardError | None:
    """The first refusal a journal holds, as the ShardError that was raised."""
    for entry in journal_entries(path):
        if "refusal" in entry:
            refused = entry["refusal"]
            return shard_error(refused["reason"], refused["message"], shard=refused["shard"])
    return None


class ShardReader:
    """Reads the shards of one verified manifest from its data dir, each checked against its signed digest; with an
    `allow` list, only the shards on it (any other read is refused as `not-allowed`). Every shard it decodes is held
    to `bound` (decoded bytes at most its ratio times the shard's signed size, and at most its ceiling).

    Each read opens the file once, hashes the bytes it read and hands them on only when they match their signed
    digest (the whole file's, or a chunk's), so a file swapped after verification is never used; every verified
    read of a whole shard is appended to `log`.

    Args:
        verified: A manifest `open_manifest` verified (signatures, expiry, rollback).
        log: Where verified reads are recorded; None: a new `ReadLog`.
        allow: The shards this reader may read (a cycle's accepted ones); None: every listed shard.
        bound: How far a shard may decode (`DecodeBound`: a ratio of its signed size and a ceiling in bytes).

    Raises:
        ShardError: (from its reads) A shard that is unlisted, listed twice, unsafely named, not allowed, missing,
            not a regular file, of another size or digest than signed, or that does not decode within its signed
            `records` and the bound; the subclass and its `reason` say which.

    Example::

        from pathlib import Path
        from trainguard import ShardReader
        from trainguard.provenance import open_manifest

        verified = open_manifest(Path("data/train.manifest.json"), Path("trust.yaml"), dataset="digits-contributed")
        reader = ShardReader(verified)
        frame = reader.read_frame("alice/part-0.parquet")  # only if its bytes match the signed digest
        print(reader.log.digest())
    """

    def __init__(
        self,
        verified: VerifiedManifest,
        log: ReadLog | None = None,
        allow: AllowList | None = None,
        *,
        bound: DecodeBound = DEFAULT_BOUND,
    ) -> None:
        self.verified = verified
        self.log = log if log is not None else ReadLog()
        self.allow = allow
        self.bound = bound
        self._entries: dict[str, ShardEntry | None] = {}
        for shard in verified.manifest.shards:
            self._entries[shard.name] = None if shard.name in self._entries else shard

    @property
    def root(self) -> Path:
        return self.verified.data_dir

    def entry(self, name: str) -> ShardEntry:
        """The signed entry for `name`; refuses unlisted, duplicate and unsafe names."""
        if name not in self._entries:
            raise UnlistedShardError(f"shard {name}: not listed in the manifest", shard=name)
        shard = self._entries[name]
        if shard is None:
            raise DuplicateShardError(f"shard {name}: listed more than once", shard=name)
        problem = name_problem(name)
        if problem is not None:
            raise UnsafePathError(f"shard {name}: unsafe name: {problem}", shard=name)
        if not self.permitted(shard):
            message = f"shard {name}: verified, but not on the allow-list this reader trains through"
            raise NotAllowedError(message, shard=name)
        return shard

    def permitted(self, shard: ShardEntry) -> bool:
        """Whether the allow-list (if any) lets this reader read `shard`."""
        if self.allow is None:
            return True
        from trainguard.provenance.allowlist import AllowedShard

        manifest = self.verified
        return self.allow.permits(
            AllowedShard(manifest.manifest_sha256, manifest.manifest.dataset, shard.name, shard.sha256)
        )

    def _record(self, shard: ShardEntry, sha256: str) -> None:
        manifest = self.verified
        self.log.append(ReadRecord(manifest.manifest_sha256, manifest.manifest.dataset, shard.name, sha256, shard.size))

    def _open(self, shard: ShardEntry) -> int:
        problem = entry_problem(self.root, shard.name)
        if problem is not None:
            raise shard_error(problem[0], f"shard {shard.name}: {problem[1]}", shard=shard.name)
        fd = open_regular(self.root / shard.name, shard.name)
        size = os.fstat(fd).st_size
        if size != shard.size:
            os.close(fd)
            kind = TruncatedShardError if size < shard.size else AppendedShardError
            raise kind(f"shard {shard.name}: {size} bytes, signed {shard.size}", shard=shard.name)
        return fd

    def read_bytes(self, name: str) -> bytes:
        """The shard's bytes, read once and returned only if their SHA-256 matches the signed digest."""
        shard = self.entry(name)
        with os.fdopen(self._open(shard), "rb") as stream:
            data = stream.read(shard.size + 1)
        if len(data) != shard.size:
            kind = TruncatedShardError if len(data) < shard.size else AppendedShardError
            raise kind(f"shard {name}: changed while reading ({len(data)} bytes, signed {shard.size})", shard=name)
        _check_digest(shard, hashlib.sha256(data).hexdigest())
        self._record(shard, shard.sha256)
        return data

    def read_chunk(self, name: str, index: int) -> bytes:
        """Chunk `index` of a large shard, checked against its signed chunk digest (random access)."""
        shard = self.entry(name)
        chunk_size = self.verified.manifest.chunk_size
        if not shard.chunks:
            raise ChunkMismatchError(f"shard {name}: has no chunk digests (smaller than one chunk)", shard=name)
        if not 0 <= index < len(shard.chunks):
            raise ChunkMismatchError(f"shard {name}: no chunk {index}", shard=name)
        fd = self._open(shard)
        try:
            data = os.pread(fd, chunk_size, index * chunk_size)
        finally:
            os.close(fd)
        expected = min(chunk_size, shard.size - index * chunk_size)
        if len(data) != expected or hashlib.sha256(data).hexdigest() != shard.chunks[index]:
            raise ChunkMismatchError(f"shard {name}: chunk {index} differs from its signed digest", shard=name)
        return data

    def iter_chunks(self, name: str) -> Iterator[bytes]:
        """The shard streamed chunk by chunk, each verified before it is yielded; at the end the whole-file digest
        must match the signed subject digest too, and only then is the read logged."""
        shard = self.entry(name)
        if not shard.chunks:
            yield self.read_bytes(name)
            return
        chunk_size = self.verified.manifest.chunk_size
        whole = hashlib.sha256()
        with os.fdopen(self._open(shard), "rb") as stream:
            for index, expected in enumerate(shard.chunks):
                data = stream.read(chunk_size)
                if hashlib.sha256(data).hexdigest() != expected:
                    raise ChunkMismatchError(f"shard {name}: chunk {index} differs from its signed digest", shard=name)
                whole.update(data)
                yield data
            if stream.read(1):
                raise AppendedShardError(f"shard {name}: grew while reading", shard=name)
        _check_digest(shard, whole.hexdigest())
        self._record(shard, shard.sha256)

    def open(self, name: str) -> VerifiedFile:
        """A read-only file object over the shard's verified bytes, for code that wants a file
        (`PIL.Image.open(reader.open(name))`, `np.load(reader.open(name))`); the shard is read and checked once."""
        return VerifiedFile(self.read_bytes(name), name)

    def copy_to(self, name: str, target: str) -> None:
        """Copies shard `name` into the new file `target` in one pass: `COPY_BLOCK` reads, each hashed and written, so
        every byte is read and hashed once (a large shard's chunk digests are not needed: nothing reads `target` before
        the caller publishes it). Only when exactly the signed size was read and the whole-file SHA-256 matches the
        signed digest does this return, and log the read; otherwise it raises the ShardError and `target` must be
        removed. The shard is opened as every read opens it (listed, allowed, safe path, regular file, signed
        size)."""
        shard = self.entry(name)
        digest = hashlib.sha256()
        buffer = memoryview(bytearray(max(1, min(COPY_BLOCK, shard.size))))
        remaining = shard.size
        with os.fdopen(self._open(shard), "rb", buffering=0) as source, open(target, "xb") as copy:
            while remaining:
                count = source.readinto(buffer[: min(len(buffer), remaining)])
                if not count:
                    message = (
                        f"shard {name}: changed while reading ({shard.size - remaining} bytes, signed {shard.size})"
                    )
                    raise TruncatedShardError(message, shard=name)
                block = buffer[:count]
                digest.update(block)
                copy.write(block)
                remaining -= count
            if source.read(1):
                raise AppendedShardError(f"shard {name}: grew while reading", shard=name)
        _check_digest(shard, digest.hexdigest())
        self._record(shard, shard.sha256)

    def read_samples(self, name: str, decoder: Decoder | Mapping[str, Decoder]) -> Samples:
        """The shard decoded by `decoder` (or the one a mapping holds for its suffix) from its verified bytes; the
        samples must number the signed `records` and fit the decode bound, whatever decoder made them."""
        decode = decoder_for(name, decoder) if isinstance(decoder, Mapping) else decoder
        shard = self.entry(name)
        data = self.read_bytes(name)
        with decoding(name, f"decoder {_describe(decode)}"):  # a user's decoder fails closed too
            if isinstance(decode, BoundedDecoder):
                returned = decode(name, data, records=shard.records, bound=self.bound)
            else:
                returned = decode(name, data)
        samples = _decoded_samples(name, decode, returned)
        decoded = samples.inputs.nbytes + samples.targets.nbytes
        check_decode(name, len(samples), decoded, shard.records, self.bound.limit(shard.size))
        return samples

    def read_frame(self, name: str, columns: list[str] | None = None) -> pd.DataFrame:
        """The shard as a data frame, decoded only within its signed `records` and the decode bound."""
        data = self.read_bytes(name)
        return self._frame(name, data, columns)

    def read_array(self, name: str) -> np.ndarray:
        """The `.npy` shard as an array, decoded only within its signed `records` and the decode bound."""
        from trainguard.provenance.formats.arrays import parse_array

        data = self.read_bytes(name)
        with decoding(name):
            return parse_array(name, data, records=self.entry(name).records, bound=self.bound)

    def frames(self, names: Iterable[str], columns: list[str] | None = None) -> Iterator[tuple[str, pd.DataFrame]]:
        """Parsed shards in order; the next shard is read and hashed in a thread while this one is parsed."""
        ordered = list(names)
        if not ordered:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainguard-read") as pool:
            pending = pool.submit(self.read_bytes, ordered[0])
            for index, name in enumerate(ordered):
                data = pending.result()
                if index + 1 < len(ordered):
                    pending = pool.submit(self.read_bytes, ordered[index + 1])
                yield name, self._frame(name, data, columns)

    def _frame(self, name: str, data: bytes, columns: list[str] | None) -> pd.DataFrame:
        from trainguard.provenance.formats.tables import parse_frame

        with decoding(name):
            return parse_frame(name, data, columns, records=self.entry(name).records, bound=self.bound)


def _check_digest(shard: ShardEntry, found: str) -> None:
    """Refuses bytes whose whole-file SHA-256 is not the signed one."""
    if found != shard.sha256:
        raise DigestMismatchError(
            f"shard {shard.name}: whole-file sha256 {found} differs from the signed {shard.sha256}",
            shard=shard.name,
        )


class VerifiedFile(io.BytesIO):
    """A read-only, seekable file over one shard's verified bytes; `name` is the shard's name."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    @override
    def writable(self) -> bool:
        return False

    @override
    def write(self, data: object) -> int:
        raise io.UnsupportedOperation(f"shard {self.name} is opened read-only")

    @override
    def writelines(self, lines: object) -> None:
        raise io.UnsupportedOperation(f"shard {self.name} is opened read-only")

    @override
    def truncate(self, size: int | None = None) -> int:
        raise io.UnsupportedOperation(f"shard {self.name} is opened read-only")

    @override
    def getbuffer(self) -> memoryview:
        raise io.UnsupportedOperation(f"shard {self.name} is opened read-only")


def _decoded_samples(name: str, decoder: object, returned: object) -> Samples:
    """What a decoder returned, refused unless it is Samples (a user's decoder may return anything)."""
    if not isinstance(returned, Samples):
        message = f"shard {name}: decoder {_describe(decoder)} returned {type(returned).__name__}, not Samples"
        raise ShardFormatError(message, shard=name)
    return returned


def _describe(decoder: object) -> str:
    return getattr(decoder, "__qualname__", type(decoder).__qualname__)
