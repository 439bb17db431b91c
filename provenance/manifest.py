"""The dataset manifest: an in-toto Statement v1 with one subject per shard and a trainguard dataset predicate.

Pure logic: building the statement from shard facts, canonical bytes, and strict parsing back (MalformedError).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from trainguard import strictjson
from trainguard.provenance.errors import MalformedError

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
"""The `_type` of every manifest statement: in-toto Statement v1."""
PAYLOAD_TYPE = "application/vnd.in-toto+json"
"""The payloadType of a manifest's DSSE envelope; verification refuses any other (PayloadTypeError)."""
PREDICATE_TYPE = "https://trainguard.dev/dataset-manifest/v1"
"""The predicateType of trainguard's dataset predicate (name, version, lifetime, chunk size, shard facts)."""
ROLES = ("train", "trusted", "holdout")
"""`train`: screened before training; `trusted`: trained on unscreened (the base RONI and the gate start from);
`holdout`: never trained on, the held-out set every check measures on. Only a key set granted a role may claim it."""
DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SOURCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}")
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)


@dataclass(frozen=True)
class ShardEntry:
    """One signed shard: an in-toto subject (name and digests) and the facts the predicate states about it.

    Attributes:
        name: The shard's path relative to its data folder (POSIX separators).
        sha256: Hex SHA-256 of the whole file.
        size: Its size in bytes.
        source: Who contributed it: a letter or digit, then up to 127 of `A-Za-z0-9._@:+-`.
        role: `train`, `trusted` or `holdout` (`ROLES`); only a key set granted the role may claim it.
        records: How many samples it holds, where its format's metadata says (None otherwise).
        chunks: SHA-256 digests of consecutive `chunk_size` pieces (large shards only; empty otherwise).
        blake3: A second whole-file digest (hex BLAKE3) that verification may check instead of `sha256`; None
            when not signed.
    """

    name: str
    sha256: str
    size: int
    source: str
    role: str
    records: int | None = None
    chunks: tuple[str, ...] = ()
    blake3: str | None = None

    def chunk_count(self, chunk_size: int) -> int:
        return math.ceil(self.size / chunk_size)


@dataclass(frozen=True)
class Manifest:
    """A dataset as signed: its name, version and lifetime, and every shard with its digests, source and role.

    Attributes:
        dataset: The dataset's name (a simple name, as a source id), which a verifier can require (`dataset=`).
        version: The version (>= 0); anti-rollback refuses a lower one, or the same one with other content.
        created: When it was signed (UTC).
        expires: When it stops verifying (ExpiredError from then on).
        shards: One entry per shard, in manifest order.
        chunk_size: The bytes of each chunk the `chunks` digests of large shards cover (8 MiB by default).
        shuffle_seed: The seed of the permutation the rows were dealt across the shards with (`trainguard
            shard`), signed so the order can be reproduced; None when the rows kept their source order or the
            shards were made elsewhere.
    """

    dataset: str
    version: int
    created: datetime
    expires: datetime
    shards: tuple[ShardEntry, ...]
    chunk_size: int = DEFAULT_CHUNK_SIZE
    shuffle_seed: int | None = None

    def select(
        self, roles: Iterable[str] | None = None, sources: Iterable[str] | None = None
    ) -> tuple[ShardEntry, ...]:
        """Shards with one of `roles` and `sources` (None: any), in manifest order."""
        role_set = None if roles is None else set(roles)
        source_set = None if sources is None else set(sources)
        return tuple(
            s
            for s in self.shards
            if (role_set is None or s.role in role_set) and (source_set is None or s.source in source_set)
        )

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)


def rfc3339(moment: datetime) -> str:
    """`moment` in UTC as `YYYY-MM-DDTHH:MM:SSZ` (four-digit year even before 1000, so it parses back)."""
    return moment.astimezone(UTC).replace(microsecond=0, tzinfo=None).isoformat() + "Z"


def parse_rfc3339(text: str, what: str = "time") -> datetime:
    """An RFC 3339 date-time with a zone (`YYYY-MM-DDTHH:MM:SS[.frac](Z|+hh:mm|-hh:mm)`), in UTC.

    Only that grammar: no space separator, week or ordinal dates, naive times, leap seconds, or instants that fall
    outside the years 1-9999 once moved to UTC.
    """
    match = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise MalformedError(f"{what} {text!r} is not an RFC 3339 time (YYYY-MM-DDTHH:MM:SS[.frac]Z or +hh:mm)")
    year, month, day, hour, minute, second, fraction, utc, sign, zone_h, zone_m = match.groups()
    try:
        if int(zone_h or 0) > 23 or int(zone_m or 0) > 59:
            raise ValueError("zone offset out of range")
        offset = timedelta(hours=int(zone_h or 0), minutes=int(zone_m or 0))
        zone = UTC if utc else timezone(-offset if sign == "-" else offset)
        micro = int((fraction or "0").ljust(6, "0")[:6])
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micro, zone)
        return moment.astimezone(UTC)
    except (ValueError, OverflowError) as error:
        raise MalformedError(f"{what} {text!r} is not a valid RFC 3339 time: {error}") from None


def shard_documents(shards: Iterable[ShardEntry]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The in-toto subjects and the predicate facts of `shards`, as both manifest layouts write them."""
    subjects, described = [], []
    for shard in shards:
        entry: dict[str, Any] = {
            "name": shard.name,
            "size": shard.size,
            "records": shard.records,
            "source": shard.source,
            "role": shard.role,
        }
        if shard.chunks:
            entry["chunks"] = list(shard.chunks)
        digest = {"sha256": shard.sha256} if shard.blake3 is None else {"sha256": shard.sha256, "blake3": shard.blake3}
        subjects.append({"name": shard.name, "digest": digest})
        described.append(entry)
    return subjects, described


def to_statement(manifest: Manifest) -> dict[str, Any]:
    subjects, shards = shard_documents(manifest.shards)
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": PREDICATE_TYPE,
        "predicate": {**predicate_header(manifest), "shards": shards},
    }


def predicate_header(manifest: Manifest) -> dict[str, Any]:
    """What every layout's predicate states of the dataset as a whole: name, version, lifetime and chunk size, and
    the shuffle seed where the rows were shuffled across shards."""
    header: dict[str, Any] = {
        "dataset": manifest.dataset,
        "version": manifest.version,
        "created": rfc3339(manifest.created),
        "expires": rfc3339(manifest.expires),
        "chunkSize": manifest.chunk_size,
    }
    if manifest.shuffle_seed is not None:
        header["shuffle"] = {"seed": manifest.shuffle_seed}
    return header


def statement_bytes(manifest: Manifest) -> bytes:
    """Canonical JSON (sorted keys, compact): the payload that is signed."""
    return json.dumps(to_statement(manifest), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_statement(payload: bytes) -> Manifest:
    """The manifest in a signed payload, parsed as strict JSON; anything off-format raises MalformedError (exit 2).

    Subject names are kept as written: unsafe or duplicate names are reported per shard by the verifier. Parse only
    a payload whose signature was checked (`open_manifest` does both).

    Args:
        payload: A single-file manifest envelope's payload: the in-toto statement's JSON bytes.

    Returns:
        The manifest it states.

    Raises:
        MalformedError: Not strict JSON, another statement or predicate type, or a field missing or malformed.
    """
    try:
        statement = strictjson.loads(payload)
    except strictjson.StrictJSONError as error:
        raise MalformedError(f"statement is not strict JSON: {error}") from None
    document = _mapping(statement, "statement")
    if document.get("_type") != STATEMENT_TYPE:
        raise MalformedError(f"statement _type is {document.get('_type')!r}, not {STATEMENT_TYPE}")
    if document.get("predicateType") != PREDICATE_TYPE:
        raise MalformedError(f"predicateType is {document.get('predicateType')!r}, not {PREDICATE_TYPE}")
    predicate = _mapping(document.get("predicate"), "predicate")
    header = parse_header(predicate)
    shards = parse_shards(document.get("subject"), predicate.get("shards"), header.chunk_size)
    return Manifest(
        header.dataset, header.version, header.created, header.expires, shards, header.chunk_size, header.shuffle_seed
    )


def parse_header(predicate: Mapping[str, Any]) -> Manifest:
    """The dataset, version, times and chunk size of a predicate (shards left empty), as both layouts sign them."""
    dataset = predicate.get("dataset")
    if not isinstance(dataset, str) or not _SOURCE.fullmatch(dataset):
        raise MalformedError(f"predicate.dataset {dataset!r} is not a simple name")
    return Manifest(
        dataset=dataset,
        version=_int(predicate.get("version"), "predicate.version", minimum=0),
        created=parse_rfc3339(_str(predicate.get("created"), "predicate.created"), "predicate.created"),
        expires=parse_rfc3339(_str(predicate.get("expires"), "predicate.expires"), "predicate.expires"),
        shards=(),
        chunk_size=_int(predicate.get("chunkSize"), "predicate.chunkSize", minimum=1),
        shuffle_seed=_shuffle_seed(predicate.get("shuffle")),
    )


def _shuffle_seed(shuffle: object) -> int | None:
    """`predicate.shuffle.seed` (absent: the rows kept their order)."""
    if shuffle is None:
        return None
    if not isinstance(shuffle, dict) or set(shuffle) != {"seed"}:
        raise MalformedError("predicate.shuffle is not a JSON object holding only a seed")
    return _int(shuffle["seed"], "predicate.shuffle.seed", minimum=0)


def parse_shards(subjects: object, described: object, chunk_size: int) -> tuple[ShardEntry, ...]:
    """Shard entries from parallel lists of in-toto subjects and predicate facts."""
    subjects = _list(subjects, "subject")
    described = _list(described, "predicate.shards")
    if len(described) != len(subjects):
        raise MalformedError(f"{len(subjects)} subjects but {len(described)} predicate shards")
    return tuple(
        _shard(subject, facts, index, chunk_size)
        for index, (subject, facts) in enumerate(zip(subjects, described, strict=True))
    )


def is_simple_name(text: object) -> bool:
    """Whether `text` is a dataset or source id: a letter or digit, then up to 127 of `A-Za-z0-9._@:+-`."""
    return isinstance(text, str) and _SOURCE.fullmatch(text) is not None


def _shard(subject: object, facts: object, index: int, chunk_size: int) -> ShardEntry:
    """One entry; the common case runs without building any message (a manifest may hold millions of them)."""
    subject_map = _mapping(subject, f"subject[{index}]") if type(subject) is not dict else subject
    facts_map = _mapping(facts, f"predicate.shards[{index}]") if type(facts) is not dict else facts
    name = subject_map.get("name")
    if type(name) is not str:
        raise MalformedError(f"subject[{index}].name is not a string")
    digests = subject_map.get("digest")
    if type(digests) is not dict:
        raise MalformedError(f"subject[{index}].digest is not a JSON object")
    digest, blake3 = digests.get("sha256"), digests.get("blake3")
    if type(digest) is not str or not _HEX64.fullmatch(digest):
        raise MalformedError(f"subject[{index}] ({name!r}) has no lowercase hex sha256 digest")
    if blake3 is not None and not (type(blake3) is str and _HEX64.fullmatch(blake3)):
        raise MalformedError(f"subject[{index}] ({name!r}) has a blake3 digest that is not 64 lowercase hex characters")
    if facts_map.get("name") != name:
        raise MalformedError(f"predicate.shards[{index}] names {facts_map.get('name')!r}, subject names {name!r}")
    size, records = facts_map.get("size"), facts_map.get("records")
    if type(size) is not int or size < 0:
        size = _int(size, f"shard {name!r} size", minimum=0)
    if records is not None and (type(records) is not int or records < 0):
        records = _int(records, f"shard {name!r} records", minimum=0)
    source, role = facts_map.get("source"), facts_map.get("role")
    if type(source) is not str or not _SOURCE.fullmatch(source):
        raise MalformedError(f"shard {name!r} source {source!r} is not a simple id")
    if role not in ROLES:
        raise MalformedError(f"shard {name!r} role {role!r} is not one of {', '.join(ROLES)}")
    chunks = _chunks(name, facts_map["chunks"], size, chunk_size) if "chunks" in facts_map else ()
    return ShardEntry(name, digest, size, source, str(role), records, chunks, blake3)


def _chunks(name: str, chunks: object, size: int, chunk_size: int) -> tuple[str, ...]:
    where = f"shard {name!r}"
    listed = tuple(_list(chunks, f"{where} chunks"))
    if not listed:
        return ()
    if len(listed) != math.ceil(size / chunk_size):
        raise MalformedError(f"{where} has {len(listed)} chunk digests for {size} bytes in {chunk_size}-byte chunks")
    if not all(isinstance(c, str) and _HEX64.fullmatch(c) for c in listed):
        raise MalformedError(f"{where} has a chunk digest that is not lowercase hex sha256")
    return listed


def _mapping(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise MalformedError(f"{what} is not a JSON object")
    return value


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise MalformedError(f"{what} is not a JSON list")
    return value


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise MalformedError(f"{what} is not a string")
    return value


def _int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MalformedError(f"{what} is not an integer >= {minimum}")
    return value
