"""The allow-list a retraining cycle trains through: exactly the shards it verified and accepted, each named by the
digest of the manifest that listed it, its name and its content digest; and the check of a read log against it.

Training never re-opens manifests by path: it reads through the statements the intake verified, and a shard that
is not on the list is refused at read time, so what is trained on is exactly what was checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainguard.provenance.errors import ReadLogMismatchError

if TYPE_CHECKING:
    from trainguard.provenance.reader import ReadLog, ReadRecord


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


@dataclass(frozen=True)
class AllowList:
    """The shards a cycle verified and accepted; nothing else may be read while it trains."""

    shards: frozenset[AllowedShard]

    @classmethod
    def of(cls, shards: Iterable[AllowedShard]) -> AllowList:
        return cls(frozenset(shards))

    def permits(self, shard: AllowedShard) -> bool:
        return shard in self.shards

    def check_reads(self, log: ReadLog) -> None:
        """Refuses a read log with a read not on the list, or a listed shard never read (a fit that did not train
        on what the attestation will say it trained on)."""
        read = {_allowed(record) for record in log.records}
        stray = sorted(read - self.shards)
        if stray:
            raise ReadLogMismatchError(
                f"shard {stray[0].key} (sha256 {stray[0].sha256[:16]}...) was read but is not on the cycle's "
                "allow-list",
                shard=stray[0].key,
            )
        unread = sorted(self.shards - read)
        if unread:
            raise ReadLogMismatchError(
                f"shard {unread[0].key} is on the allow-list but training never read it ({len(unread)} unread)",
                shard=unread[0].key,
            )

    def to_json(self) -> list[dict[str, str]]:
        return [vars(shard) for shard in sorted(self.shards)]


def _allowed(record: ReadRecord) -> AllowedShard:
    return AllowedShard(record.manifest_sha256, record.dataset, record.name, record.sha256)
