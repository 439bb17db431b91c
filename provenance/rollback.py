"""Anti-rollback: the highest manifest version accepted per (key set, dataset), and the statement digest at it.

Records are kept under the signing key set's name (`rollback_key`): the policy's `signers[].name`, or for a key
set without one (a bare `.pub`) `key:<keyid>` of its first key. A name survives adding, rotating or removing keys
and changing the threshold, so such a policy edit keeps the records. A manifest is checked against more than its
own namespace (`RollbackScope`): every key set holding a key that signed it, records from before names (kept under
a fingerprint of the exact key set), any record whose key set held a signing key, and a renamed key set's records
(a name the policy no longer has whose key set shared a key with this one). A second key set with other keys that
signs the same dataset name still cannot lock this one out, nor replay into its namespace.

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
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from trainguard.files import atomic_write, read_regular
from trainguard.provenance.errors import MalformedError, RollbackError

STATE_NAME = "provenance-state.json"
STATE_LIMIT = 16 * 1024 * 1024
_SCHEMA = 3
_READS = (2, 3)
"""Schema 2 records are all keyed by key-set fingerprint; they are read, and honoured, as they are."""
_HEX64 = re.compile(r"[0-9a-f]{64}")
KEY_SET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
"""A key set's name as a policy gives it: its records' namespace, so no `/`, `:` or anything a path or shell reads."""
_KEY_NAME = re.compile(r"key:[0-9a-f]{64}")


def default_state_path() -> Path:
    """Where anti-rollback records live: `$TRAINGUARD_HOME`, else `.trainguard/` of the working (project) folder.

    Returns:
        `$TRAINGUARD_HOME/provenance-state.json` when that variable is set, else the relative path
        `.trainguard/provenance-state.json`.
    """
    home = os.environ.get("TRAINGUARD_HOME")
    if home:
        return Path(home) / STATE_NAME
    return Path(".trainguard") / STATE_NAME


def rollback_key(namespace: str, dataset: str) -> str:
    """The records of one dataset as signed by one key set (`namespace`: its name, or `key_name` of its key)."""
    return f"{namespace}/{dataset}"


def key_name(keyid: str) -> str:
    """The name of a key set the policy does not name (a bare `.pub`): its key's keyid, which no file move or
    rename changes; `:` keeps it apart from every name a policy may give."""
    return f"key:{keyid}"


def _namespace_ok(namespace: str) -> bool:
    """A key-set name, a key's name, or a key-set fingerprint (records written before key sets had names)."""
    return any(p.fullmatch(namespace) for p in (KEY_SET_NAME, _KEY_NAME, _HEX64))


@dataclass(frozen=True)
class Accepted:
    """The highest version accepted in a namespace, its statement digest, and every key its key set held when it
    recorded one (so the records are found again after the key set is renamed)."""

    version: int
    statement_sha256: str
    keyids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RollbackScope:
    """The records a manifest's version is checked against, and `key`, the namespace it is recorded in.

    Checked: every namespace in `namespaces` (its own and those of every key set holding a key that signed it, by
    name and by the fingerprint they were kept under before names), every record whose key set held one of the
    `signers`, and every record under a name not among the policy's `names` whose key set held one of `keyids`
    (the recording key set's keys): that key set renamed."""

    dataset: str
    key: str
    keyids: frozenset[str]
    namespaces: frozenset[str]
    signers: frozenset[str]
    names: frozenset[str]

    def covers(self, key: str, accepted: Accepted) -> bool:
        """Whether the record under `key` bounds this manifest's version."""
        namespace, _, dataset = key.partition("/")
        if dataset != self.dataset:
            return False
        renamed = namespace not in self.names and not accepted.keyids.isdisjoint(self.keyids)
        return namespace in self.namespaces or not accepted.keyids.isdisjoint(self.signers) or renamed


class RollbackCheck(Protocol):
    """What manifest verification asks of anti-rollback storage."""

    def check_scope(self, scope: RollbackScope, version: int, statement_sha256: str) -> None: ...


@dataclass(frozen=True)
class RollbackRecords:
    """Accepted versions by rollback key: pure checks and updates, no storage."""

    accepted: Mapping[str, Accepted] = field(default_factory=dict)

    def check(self, key: str, version: int, statement_sha256: str) -> None:
        """Refuses a version lower than the one accepted under `key`, or that version with a different statement."""
        accepted = self.accepted.get(key)
        if accepted is not None:
            _compare(key, accepted, version, statement_sha256)

    def check_scope(self, scope: RollbackScope, version: int, statement_sha256: str) -> None:
        """`check` against every record the scope covers, its own namespace first."""
        covered = sorted((key != scope.key, key) for key, entry in self.accepted.items() if scope.covers(key, entry))
        for _, key in covered:
            _compare(key, self.accepted[key], version, statement_sha256)

    def recorded(self, key: str, version: int, statement_sha256: str, keyids: Iterable[str] = ()) -> RollbackRecords:
        """These records with the manifest accepted under `key` (checked first), `keyids` (the keys of the key set
        recording it) added to the keys that namespace has held."""
        self.check(key, version, statement_sha256)
        held = frozenset(keyids) | (self.accepted[key].keyids if key in self.accepted else frozenset())
        return RollbackRecords({**self.accepted, key: Accepted(version, statement_sha256, held)})

    def to_json(self) -> dict[str, dict[str, object]]:
        return {
            key: {"version": e.version, "statement_sha256": e.statement_sha256, "keyids": sorted(e.keyids)}
            for key, e in sorted(self.accepted.items())
        }

    @classmethod
    def from_json(cls, document: object, source: str) -> RollbackRecords:
        """Records from their JSON form; anything off-format is a MalformedError naming `source`."""
        if not isinstance(document, dict):
            raise MalformedError(f"{source}: rollback records are not a mapping", path=source)
        accepted = {}
        for key, entry in document.items():
            version = entry.get("version") if isinstance(entry, dict) else None
            digest = entry.get("statement_sha256") if isinstance(entry, dict) else None
            keyids = entry.get("keyids", []) if isinstance(entry, dict) else None
            valid_key = isinstance(key, str) and _namespace_ok(key.partition("/")[0]) and key.partition("/")[2]
            if not valid_key or isinstance(version, bool) or not isinstance(version, int) or version < 0:
                raise MalformedError(f"{source}: rollback entry {key!r} is corrupt", path=source)
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                raise MalformedError(f"{source}: rollback entry {key!r} has no statement digest", path=source)
            if not isinstance(keyids, list) or not all(isinstance(k, str) and _HEX64.fullmatch(k) for k in keyids):
                raise MalformedError(f"{source}: rollback entry {key!r} has corrupt keyids", path=source)
            accepted[key] = Accepted(version, digest, frozenset(keyids))
        return cls(accepted)


def _compare(key: str, accepted: Accepted, version: int, statement_sha256: str) -> None:
    namespace, _, dataset = key.partition("/")
    where = f"key set {_shown(namespace)}"
    if version < accepted.version:
        raise RollbackError(
            f"dataset {dataset!r}: manifest version {version} is older than accepted version "
            f"{accepted.version} ({where}; rollback)"
        )
    if version == accepted.version and statement_sha256 != accepted.statement_sha256:
        raise RollbackError(
            f"dataset {dataset!r}: version {version} was already accepted with different content ({where}); "
            "a re-signed manifest needs a higher version"
        )


def _shown(namespace: str) -> str:
    """A namespace as messages name it: a key set's name, its key, or its fingerprint from before names."""
    if namespace.startswith("key:"):
        return f"of key {namespace[4:20]}"
    if _HEX64.fullmatch(namespace):
        return f"with fingerprint {namespace[:16]} (recorded before key sets had names)"
    return repr(namespace)


@dataclass(frozen=True)
class RollbackState:
    """A user's rollback records in a JSON file (a missing file is empty: verification on a new machine).

    `verify_dataset` checks a manifest's version against it and records the version when everything passed;
    `record` updates the file under an exclusive lock with an atomic write.

    Attributes:
        path: The JSON state file, e.g. `default_state_path()`; its folder is created on the first record.

    Raises:
        MalformedError: (from `load` and the checks) The file cannot be read, is not strict JSON, or is not a
            state of a known schema.
        RollbackError: (from the checks and `record`) A version lower than one accepted, or an accepted version
            with different content.
    """

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
        if not isinstance(document, dict) or document.get("schema") not in _READS:
            raise MalformedError(
                f"rollback state {self.path} is not a schema-{'/'.join(map(str, _READS))} state (records keyed by "
                "key set and dataset); move it aside to start a new one",
                path=str(self.path),
            )
        return RollbackRecords.from_json(document.get("accepted"), str(self.path))

    def check(self, key: str, version: int, statement_sha256: str) -> None:
        self.load().check(key, version, statement_sha256)

    def check_scope(self, scope: RollbackScope, version: int, statement_sha256: str) -> None:
        self.load().check_scope(scope, version, statement_sha256)

    def record(self, key: str, version: int, statement_sha256: str, keyids: Iterable[str] = ()) -> None:
        """Records the manifest as accepted under `key` by a key set of `keyids` (checked again under the lock)."""
        with self._locked():
            records = self.load().recorded(key, version, statement_sha256, keyids)
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
