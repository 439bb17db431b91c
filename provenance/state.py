"""Anti-rollback state: the highest manifest version accepted per dataset, and the statement digest accepted at it.

One JSON file per user (default `$TRAINGUARD_HOME/provenance-state.json`, else
`~/.local/state/trainguard/provenance-state.json`), updated under an exclusive lock with an atomic rename.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from trainguard.provenance.errors import MalformedError, RollbackError

STATE_NAME = "provenance-state.json"


def default_state_path() -> Path:
    home = os.environ.get("TRAINGUARD_HOME")
    if home:
        return Path(home) / STATE_NAME
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "trainguard" / STATE_NAME


@dataclass(frozen=True)
class Accepted:
    version: int
    statement_sha256: str


@dataclass(frozen=True)
class RollbackState:
    path: Path

    def load(self) -> dict[str, Accepted]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as error:
            raise MalformedError(f"cannot read rollback state {self.path}: {error}", path=str(self.path)) from None
        try:
            document = json.loads(text)
            return {
                name: Accepted(int(entry["version"]), str(entry["statement_sha256"]))
                for name, entry in document["datasets"].items()
            }
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise MalformedError(
                f"rollback state {self.path} is corrupt; it is never reset silently: inspect or remove it",
                path=str(self.path),
            ) from None

    def check(self, dataset: str, version: int, statement_sha256: str) -> None:
        """Refuses a version lower than the one accepted, or the accepted version with a different statement."""
        accepted = self.load().get(dataset)
        if accepted is None:
            return
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

    def record(self, dataset: str, version: int, statement_sha256: str) -> None:
        """Records the manifest as accepted (after checking again under the lock)."""
        with self._locked():
            self.check(dataset, version, statement_sha256)
            datasets = {name: vars(entry) for name, entry in self.load().items()}
            datasets[dataset] = vars(Accepted(version, statement_sha256))
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with temporary.open("w", encoding="utf-8") as stream:
                json.dump({"datasets": datasets}, stream, indent=2, sort_keys=True)
                stream.write("\n")
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
