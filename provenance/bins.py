"""The binned manifest layout for millions of shards, after TUF's hashed-bin delegations.

The signed top-level statement lists the digest and size of each bin file and declares the sources and roles the
shards claim; each bin (`<manifest>.bins/00042.json`, unsigned) lists the shards whose name hashes to it. A reader
checks the signed statement once, then loads only the bins it needs and checks each against its signed digest, so
one rank verifies its own share without parsing every entry.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainguard import strictjson
from trainguard.files import atomic_write, read_regular
from trainguard.provenance.dsse import Envelope, sign_envelope
from trainguard.provenance.errors import (
    BinError,
    BinMissingError,
    BinRollbackError,
    BinSwappedError,
    BinTamperedError,
    MalformedError,
)
from trainguard.provenance.keys import SigningKey
from trainguard.provenance.manifest import (
    PAYLOAD_TYPE,
    ROLES,
    STATEMENT_TYPE,
    Manifest,
    ShardEntry,
    is_simple_name,
    parse_header,
    parse_shards,
    parse_statement,
    predicate_header,
    shard_documents,
)
from trainguard.provenance.sigstore_bundle import bundle_path

BINNED_PREDICATE_TYPE = "https://trainguard.dev/dataset-manifest-bins/v1"
BIN_TYPE = "https://trainguard.dev/dataset-manifest-bin/v1"
BIN_THRESHOLD = 50_000
"""Shard count above which the `auto` layout writes bins instead of one manifest file."""
SHARDS_PER_BIN = 4096
_HEX64 = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class BinRef:
    """What the signed statement says of one bin: its file's SHA-256 and size, and how many shards it lists."""

    sha256: str
    size: int
    shards: int


@dataclass(frozen=True)
class BinnedIndex:
    """The signed top-level statement of a binned manifest (`header.shards` is empty: the shards are in bins)."""

    header: Manifest
    shard_count: int
    sources: tuple[str, ...]
    roles: tuple[str, ...]
    bins: tuple[BinRef, ...]


@dataclass(frozen=True)
class BinShare:
    """The bins one reader loads (a rank's share: every bin `i` with `i % world == rank`)."""

    count: int
    bins: frozenset[int]

    @classmethod
    def of_rank(cls, rank: int, world: int, count: int) -> BinShare:
        if not 0 <= rank < world:
            raise MalformedError(f"share: rank {rank} is not in 0..{world - 1} (world size {world})")
        return cls(count, frozenset(range(rank, count, world)))

    def holds(self, name: str) -> bool:
        """Whether the shard `name` would be listed in one of these bins."""
        return bin_of(name, self.count) in self.bins


@dataclass(frozen=True)
class Binned:
    """A signed top-level envelope and the bytes of its bin files, in bin order."""

    envelope: Envelope
    bins: tuple[bytes, ...]


def bin_of(name: str, count: int) -> int:
    """The bin a shard name belongs to: the first 8 bytes of SHA-256 of the name, modulo the bin count."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count


def default_bin_count(shards: int) -> int:
    """A power of two that keeps bins near SHARDS_PER_BIN shards (256 bins for a million)."""
    return 1 << max(0, math.ceil(math.log2(max(1, shards) / SHARDS_PER_BIN)))


def uses_bins(shards: int, layout: str) -> bool:
    """Whether `layout` (`single`, `bins` or `auto`: bins above BIN_THRESHOLD shards) writes bins."""
    if layout not in ("single", "bins", "auto"):
        raise MalformedError(f"layout {layout!r} is not one of single, bins, auto")
    return layout == "bins" or (layout == "auto" and shards > BIN_THRESHOLD)


def bins_folder(manifest_path: Path) -> Path:
    """Where a binned manifest's bin files live: `<manifest file name>.bins/` beside it."""
    return manifest_path.with_name(manifest_path.name + ".bins")


def manifest_files(manifest_path: Path) -> tuple[Path, Path, Path]:
    """A manifest's own files, which are never shards of the data it signs, wherever it lies in its data folder: one
    rule for signing (`build_manifest`'s `exclude`), verifying (`verify_dataset`'s walk) and re-sharding
    (`trainguard shard`). Its bins folder is among them in every layout: its bin files are unsigned and rewritten
    at each signing, so signing them as shards would sign files the next signing replaces.

    Args:
        manifest_path: The manifest's file (its signed envelope).

    Returns:
        The manifest file, its Sigstore bundle and its bins folder (any of them may not exist).
    """
    return manifest_path, bundle_path(manifest_path), bins_folder(manifest_path)


def bin_file(manifest_path: Path, index: int) -> Path:
    return bins_folder(manifest_path) / f"{index:05d}.json"


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_binned(manifest: Manifest, key: SigningKey, count: int | None = None) -> Binned:
    """The manifest split into `count` hashed bins (default: `default_bin_count`) under one signed statement."""
    count = count or default_bin_count(len(manifest.shards))
    members: list[list[ShardEntry]] = [[] for _ in range(count)]
    for shard in manifest.shards:
        members[bin_of(shard.name, count)].append(shard)
    files = tuple(_bin_bytes(manifest, index, count, shards) for index, shards in enumerate(members))
    refs = [{"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "shards": len(shards)}
            for data, shards in zip(files, members, strict=True)]  # fmt: skip
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": f"{i:05d}.json", "digest": {"sha256": r["sha256"]}} for i, r in enumerate(refs)],
        "predicateType": BINNED_PREDICATE_TYPE,
        "predicate": {
            **predicate_header(manifest),
            "shardCount": len(manifest.shards),
            "sources": sorted({s.source for s in manifest.shards}),
            "roles": sorted({s.role for s in manifest.shards}),
            "bins": refs,
        },
    }
    payload = _canonical(statement)
    parse_index(payload)  # what we sign must parse back
    return Binned(sign_envelope(PAYLOAD_TYPE, payload, key), files)


def _bin_bytes(manifest: Manifest, index: int, count: int, shards: Sequence[ShardEntry]) -> bytes:
    subjects, described = shard_documents(shards)
    document = {"_type": BIN_TYPE, "dataset": manifest.dataset, "version": manifest.version, "bin": index,
                "bins": count, "subject": subjects, "shards": described}  # fmt: skip
    return _canonical(document)


def write_binned(binned: Binned, out: Path) -> Path:
    """Writes the bin files, then the top-level envelope (a reader never finds a statement without its bins)."""
    out = Path(out)
    for index, data in enumerate(binned.bins):
        atomic_write(bin_file(out, index), data)
    atomic_write(out, binned.envelope.to_json())
    return out


def looks_binned(payload: bytes) -> bool:
    """Whether a signed payload is to be parsed as a binned top level (without a second parse of a large
    single-file statement: one that merely mentions the binned type elsewhere is refused by `parse_index`)."""
    return BINNED_PREDICATE_TYPE.encode() in payload


def statement_header(payload: bytes) -> Manifest:
    """The dataset, version and times a signed payload of either layout states (a binned one without its shards)."""
    return parse_index(payload).header if looks_binned(payload) else parse_statement(payload)


def parse_index(payload: bytes) -> BinnedIndex:
    """The signed top-level statement of a binned manifest; anything off-format raises MalformedError."""
    try:
        document = strictjson.loads(payload)
    except strictjson.StrictJSONError as error:
        raise MalformedError(f"statement is not strict JSON: {error}") from None
    if not isinstance(document, dict) or document.get("_type") != STATEMENT_TYPE:
        raise MalformedError(f"statement _type is not {STATEMENT_TYPE}")
    if document.get("predicateType") != BINNED_PREDICATE_TYPE:
        raise MalformedError(f"predicateType is {document.get('predicateType')!r}, not {BINNED_PREDICATE_TYPE}")
    predicate = document.get("predicate")
    if not isinstance(predicate, dict):
        raise MalformedError("predicate is not a JSON object")
    header = parse_header(predicate)
    refs = tuple(_ref(entry, index) for index, entry in enumerate(_list(predicate.get("bins"), "predicate.bins")))
    if not refs:
        raise MalformedError("predicate.bins lists no bins")
    subjects = _list(document.get("subject"), "subject")
    expected = [{"name": f"{i:05d}.json", "digest": {"sha256": r.sha256}} for i, r in enumerate(refs)]
    if subjects != expected:
        raise MalformedError("subject does not list the bins of predicate.bins")
    count = predicate.get("shardCount")
    if isinstance(count, bool) or not isinstance(count, int) or count != sum(r.shards for r in refs):
        raise MalformedError("predicate.shardCount is not the sum of the bins' shard counts")
    sources = tuple(_list(predicate.get("sources"), "predicate.sources"))
    if not all(is_simple_name(s) for s in sources):
        raise MalformedError("predicate.sources holds a source that is not a simple id")
    roles = tuple(_list(predicate.get("roles"), "predicate.roles"))
    if not all(r in ROLES for r in roles):
        raise MalformedError(f"predicate.roles holds a role that is not one of {', '.join(ROLES)}")
    return BinnedIndex(header, count, sources, roles, refs)


def _ref(entry: object, index: int) -> BinRef:
    where = f"predicate.bins[{index}]"
    if not isinstance(entry, dict) or set(entry) != {"sha256", "size", "shards"}:
        raise MalformedError(f"{where} is not an object of sha256, size and shards")
    digest, size, shards = entry["sha256"], entry["size"], entry["shards"]
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX64:
        raise MalformedError(f"{where} has no lowercase hex sha256 digest")
    for value, what in ((size, "size"), (shards, "shards")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MalformedError(f"{where}.{what} is not an integer >= 0")
    return BinRef(digest, size, shards)


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise MalformedError(f"{what} is not a JSON list")
    return value


def load_bin(manifest_path: Path, index: BinnedIndex, number: int) -> tuple[ShardEntry, ...]:
    """The shards of bin `number`, after its bytes match the signed digest; a missing, tampered, swapped or
    rolled-back bin raises its BinError, a signed bin inconsistent with its statement MalformedError."""
    path = bin_file(manifest_path, number)
    ref = index.bins[number]
    try:
        data = read_regular(path, limit=ref.size)
    except FileNotFoundError:
        raise BinMissingError(f"bin {number} ({path}) is missing", path=str(path)) from None
    except OSError as error:
        raise BinTamperedError(f"bin {number} ({path}) is unusable: {error.strerror}", path=str(path)) from None
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise _mismatch(path, data, index.header, number)
    return _bin_shards(data, index, number)


def _mismatch(path: Path, data: bytes, header: Manifest, number: int) -> BinError:
    """Why a bin's bytes differ from the signed digest: another bin or an older version, when it says so."""
    try:
        document = strictjson.loads(data)
    except strictjson.StrictJSONError:
        document = None
    if isinstance(document, dict) and document.get("_type") == BIN_TYPE and document.get("dataset") == header.dataset:
        version, other = document.get("version"), document.get("bin")
        if isinstance(version, int) and version < header.version:
            return BinRollbackError(
                f"bin {number} ({path}) is from version {version}, the signed manifest is version {header.version}",
                path=str(path),
            )
        if isinstance(other, int) and other != number:
            return BinSwappedError(f"bin {number} ({path}) holds bin {other}", path=str(path))
    return BinTamperedError(f"bin {number} ({path}) differs from its signed sha256", path=str(path))


def _bin_shards(data: bytes, index: BinnedIndex, number: int) -> tuple[ShardEntry, ...]:
    header = index.header
    try:
        document = strictjson.loads(data)
    except strictjson.StrictJSONError as error:
        raise MalformedError(f"signed bin {number} is not strict JSON: {error}") from None
    if not isinstance(document, dict):
        raise MalformedError(f"signed bin {number} is not a JSON object")
    facts = (document.get("_type"), document.get("dataset"), document.get("version"), document.get("bin"),
             document.get("bins"))  # fmt: skip
    if facts != (BIN_TYPE, header.dataset, header.version, number, len(index.bins)):
        raise MalformedError(f"signed bin {number} does not name this dataset, version and bin")
    shards = parse_shards(document.get("subject"), document.get("shards"), header.chunk_size)
    if len(shards) != index.bins[number].shards:
        raise MalformedError(
            f"signed bin {number} lists {len(shards)} shards, the statement {index.bins[number].shards}"
        )
    sources, roles, count = set(index.sources), set(index.roles), len(index.bins)
    for shard in shards:
        if shard.source not in sources or shard.role not in roles:
            raise MalformedError(f"shard {shard.name} claims a source or role the signed statement does not declare")
        if bin_of(shard.name, count) != number:
            raise MalformedError(f"shard {shard.name} is listed in bin {number}, its name hashes to another bin")
    return shards


def share_bins(index: BinnedIndex, share: BinShare | None) -> Iterable[int]:
    """The bin numbers to load: the share's, or every bin."""
    return range(len(index.bins)) if share is None else sorted(share.bins)
