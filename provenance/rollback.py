"""Anti-rollback: the highest manifest version accepted per (key set, dataset), and the statement digest at it.

Records are namespaced by the signing key set's fingerprint (`rollback_key`), so a second trusted key set that
signs the same dataset name at version 99 cannot lock the first out, nor replay into its namespace.
`RollbackRecords` is the pure, immutable map the checks run on; `RollbackState` keeps one per user in a JSON file
(default `$TRAINGUARD_HOME/provenance-state.json`, else `.trainguard/provenance-state.json` in the project folder
it runs in: one project's records never lock out another's),
updated under an exclusive lock with an atomic write. A retraining cycle keeps its records inside its own signed
state instead.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from trainguard.files import atomic_write, read_regular
from trainguard.provenance.errors import MalformedError, RollbackError

STATE_NAME = "provenance-state.json"
STATE_LIMIT = 16 * 1024 * 1024
_SCHEMA = 2
_HEX64 = re.compile(r"[0-9a-f]{64}")


def default_state_path() -> Path:
    """Where anti-rollback records live: `$TRAINGUARD_HOME`, else `.trainguard/` of the working (project) folder."""
    home = os.environ.get("TRAINGUARD_HOME")
    if home:
        return Path(home) / STATE_NAME
    return Path(".trainguard") / STATE_NAME


def rollback_key(key_set_fingerprint: str, dataset: str) -> str:
    """The namespace of one dataset as signed by one key set."""
    return f"{key_set_fingerprint}/{dataset}"


@dataclass(frozen=True)
class Accepted:
    version: int
    statement_sha256: str


class RollbackCheck(Protocol):
    """What manifest verification asks of anti-rollback storage."""

    def check(self, key: str, version: int, statement_sha256: str) -> None: ...


@dataclass(frozen=True)
class RollbackRecords:
    """Accepted versions by rollback key: pure checks and updates, no storage."""

    accepted: Mapping[str, Accepted] = field(default_factory=dict)

    def check(self, key: str, version: int, statement_sha256: str) -> None:
        """Refuses a version lower than the one accepted, or the accepted version with a different statement."""
        accepted = self.accepted.get(key)
        if accepted is None:
            return
        dataset = key.partition("/")[2]
        if version < accepted.version:
            raise RollbackError(
                f"dataset {dataset!r}: manifest version {version} is older than accepted version "
                f"{accepted.version} (rollback)"
            )
        if version == accepted.version and statement_sha256 != accepted.statement_sha256:
            raise RollbackError(
                f"dataset {dataset!r}: version {version} was already accepted with different content; "
                "a re-signed manifest needs a higher version"
            )

    def recorded(self, key: str, version: int, statement_sha256: str) -> RollbackRecords:
        """These records with the manifest accepted (checked first)."""
        self.check(key, version, statement_sha256)
        return RollbackRecords({**self.accepted, key: Accepted(version, statement_sha256)})

    def to_json(self) -> dict[str, dict[str, object]]:
        return {key: vars(entry) for key, entry in sorted(self.accepted.items())}

    @classmethod
    def from_json(cls, document: object, source: str) -> RollbackRecords:
        """Records from their JSON form; anything off-format is a MalformedError naming `source`."""
        if not isinstance(document, dict):
            raise MalformedError(f"{source}: rollback records are not a mapping", path=source)
        accepted = {}
        for key, entry in document.items():
            version = entry.get("version") if isinstance(entry, dict) else None
            digest = entry.get("statement_sha256") if isinstance(entry, dict) else None
            valid_key = isinstance(key, str) and _HEX64.fullmatch(key.partition("/")[0]) and key.partition("/")[2]
            if not valid_key or isinstance(version, bool) or not isinstance(version, int) or version < 0:
                raise MalformedError(f"{source}: rollback entry {key!r} is corrupt", path=source)
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                raise MalformedError(f"{source}: rollback entry {key!r} has no statement digest", path=source)
            accepted[key] = Accepted(version, digest)
        return cls(accepted)


@dataclass(frozen=True)
class RollbackState:
    """A user's rollback records in a JSON file (a missing file is empty: verification on a new machine)."""

    path: Path

    def load(self) -> RollbackRecords:
        from trainguard.strictjson import StrictJSONError, loads

        try:
            data = read_regular(self.path, limit=STATE_LIMIT)
        except FileNotFoundError:
            return RollbackRecords()
        except OSError as error:
            message = f"cannot read rollback state {self.path}: {error.strerror}"
            raise MalformedError(message, path=str(self.path)) from None
        try:
            document = loads(data)
        except StrictJSONError as error:
            raise MalformedError(
                f"rollback state {self.path} is corrupt ({error}); it is never reset silently: inspect or remove it",
                path=str(self.path),
            ) from None
        if not isinstance(document, dict) or document.get("schema") != _SCHEMA:
            raise MalformedError(
                f"rollback state {self.path} is not a schema-{_SCHEMA} state (records keyed by key set and "
                "dataset); move it aside to start a new one",
                path=str(self.path),
            )
        return RollbackRecords.from_json(document.get("accepted"), str(self.path))

    def check(self, key: str, version: int, statement_sha256: str) -> None:
        self.load().check(key, version, statement_sha256)

    def record(self, key: str, version: int, statement_sha256: str) -> None:
        """Records the manifest as accepted (after checking again under the lock)."""
        with self._locked():
            records = self.load().recorded(key, version, statement_sha256)
            document = {"schema": _SCHEMA, "accepted": records.to_json()}
            atomic_write(self.path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)
