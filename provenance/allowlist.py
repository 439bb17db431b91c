"""The allow-list a retraining cycle trains through: exactly the shards it verified and accepted, each named by the
digest of the manifest that listed it, its name and its content digest; and the check of a read log against it.

Training never re-opens manifests by path: it reads through the statements the intake verified, and a shard that
is not on the list is refused at read time, so what is trained on is exactly what was checked.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from trainguard.provenance.errors import MalformedError, ReadLogMismatchError

if TYPE_CHECKING:
    from trainguard.provenance.reader import ReadLog, ReadRecord

SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, order=True)
class AllowedShard:
    """One shard that may be read: listed in the manifest with this digest, under this name, with this content."""

    manifest_sha256: str
    dataset: str
    name: str
    sha256: str

    @property
    def key(self) -> str:
        """`dataset:name`, as decisions and reports name shards."""
        return f"{self.dataset}:{self.name}"

    @classmethod
    def from_json(cls, entry: Any, where: str = "allow-list entry") -> AllowedShard:
        """The entry as `vars(shard)` wrote it; anything else (extra or missing keys, a digest that is not SHA-256
        hex) is refused, in one line naming `where`."""
        names = [f.name for f in fields(cls)]
        if not isinstance(entry, dict) or sorted(entry) != sorted(names):
            raise MalformedError(f"{where}: expected an object with exactly {names}")
        if not all(isinstance(entry[name], str) and entry[name] for name in names):
            raise MalformedError(f"{where}: every field must be a non-empty string")
        if not all(SHA256.fullmatch(entry[name]) for name in ("manifest_sha256", "sha256")):
            raise MalformedError(f"{where}: manifest_sha256 and sha256 must be SHA-256 hex digests")
        return cls(**entry)


@dataclass(frozen=True, order=True)
class RefusedRead:
    """An allowed shard training refused as it read it: its file no longer holds the bytes the intake verified
    (changed after intake), so training went on without it. `reason` is the read's code (digest-mismatch, truncated,
    ...), `detail` its one-line message."""

    shard: AllowedShard
    reason: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {**vars(self.shard), "reason": self.reason, "detail": self.detail}

    @classmethod
    def from_json(cls, entry: Any, where: str = "refused read") -> RefusedRead:
        """The refusal `to_json` wrote; anything else is refused in one line naming `where`."""
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("reason"), str)
            or not isinstance(entry.get("detail"), str)
        ):
            raise MalformedError(f"{where}: expected an allow-list entry with a reason and a detail")
        shard = {k: v for k, v in entry.items() if k not in ("reason", "detail")}
        return cls(AllowedShard.from_json(shard, where), entry["reason"], entry["detail"])


@dataclass(frozen=True)
class AllowList:
    """The shards a cycle verified and accepted; nothing else may be read while it trains."""

    shards: frozenset[AllowedShard]

    @classmethod
    def of(cls, shards: Iterable[AllowedShard]) -> AllowList:
        return cls(frozenset(shards))

    def permits(self, shard: AllowedShard) -> bool:
        return shard in self.shards

    def check_reads(self, log: ReadLog, refused: Collection[AllowedShard] = ()) -> None:
        """Refuses a read log with a read not on the list, or a listed shard never read (a fit that did not train
        on what the attestation will say it trained on). `refused` are listed shards training refused at read time
        (changed after intake): the log must hold exactly the list without them."""
        read = {_allowed(record) for record in log.records}
        off_list = sorted(set(refused) - self.shards)
        if off_list:
            raise ReadLogMismatchError(
                f"shard {off_list[0].key} was refused at read but is not on the cycle's allow-list",
                shard=off_list[0].key,
            )
        both = sorted(read & set(refused))
        if both:
            raise ReadLogMismatchError(
                f"shard {both[0].key} was refused at read yet the read log holds it", shard=both[0].key
            )
        stray = sorted(read - self.shards)
        if stray:
            raise ReadLogMismatchError(
                f"shard {stray[0].key} (sha256 {stray[0].sha256[:16]}...) was read but is not on the cycle's "
                "allow-list",
                shard=stray[0].key,
            )
        unread = sorted(self.shards - read - set(refused))
        if unread:
            raise ReadLogMismatchError(
                f"shard {unread[0].key} is on the allow-list but training never read it ({len(unread)} unread)",
                shard=unread[0].key,
            )

    def to_json(self) -> list[dict[str, str]]:
        return [vars(shard) for shard in sorted(self.shards)]

    @classmethod
    def from_json(cls, document: Any) -> AllowList:
        """The list `to_json` wrote (parsed from strict JSON); a malformed or repeated entry is refused."""
        if not isinstance(document, list):
            raise MalformedError("allow-list: expected a list of shards")
        shards = [AllowedShard.from_json(entry, f"allow-list entry {i}") for i, entry in enumerate(document)]
        if len(set(shards)) != len(shards):
            raise MalformedError("allow-list: a shard is listed twice")
        return cls.of(shards)


def _allowed(record: ReadRecord) -> AllowedShard:
    return AllowedShard(record.manifest_sha256, record.dataset, record.name, record.sha256)
