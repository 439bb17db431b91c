"""The state kept across retraining cycles: the last accepted model, its held-out record, every shard decision.

Pure transitions on immutable values (`CycleState.begin`, `.decide`, `.accept`, ...) are separate from storage
(`StateStore`), which writes the whole state atomically (temp file, fsync, rename) after each decision. A process
killed mid-cycle leaves a `running` cycle holding every decision made so far; re-running the same config resumes
it (decided shards are not re-screened), a changed config abandons it and starts afresh. A rejected or failed
cycle never touches the last accepted model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainguard.pipeline.errors import StateError

SCHEMA_VERSION = 1
Status = Literal["running", "accepted", "rejected", "failed", "abandoned"]


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ShardDecision(_Record):
    """Whether one shard (by name and content digest) may be trained on, which check decided, and why."""

    shard: str
    sha256: str
    source: str
    accepted: bool
    check: str = Field(description="verify | validate | limits | roni | ...")
    reason: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.shard, self.sha256)


class ModelRecord(_Record):
    """A signed model directory and the digest of its weights."""

    path: str
    sha256: str
    attestation: str | None = None


class HeldoutRecord(_Record):
    """The accepted model's held-out metrics, against the held-out manifest they were measured on."""

    manifest_sha256: str
    clean_accuracy: float
    robust_accuracy: dict[str, float] = Field(default_factory=dict, description="eps (as text) -> accuracy")
    metrics: dict[str, Any] = Field(default_factory=dict, description="loss and accuracy, overall and per class")


class CycleRecord(_Record):
    cycle: int
    config_sha256: str
    status: Status = "running"
    started: str
    finished: str | None = None
    steps: tuple[str, ...] = ()
    shards: tuple[ShardDecision, ...] = ()
    candidate: ModelRecord | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    reason: str = ""


class CycleState(_Record):
    """Everything decided so far, across cycles."""

    schema_version: Literal[1] = SCHEMA_VERSION
    accepted_model: ModelRecord | None = None
    heldout: HeldoutRecord | None = None
    cycles: tuple[CycleRecord, ...] = ()

    @property
    def current(self) -> CycleRecord | None:
        """The running (unfinished) cycle, if any."""
        return self.cycles[-1] if self.cycles and self.cycles[-1].status == "running" else None

    @property
    def latest(self) -> CycleRecord | None:
        """The most recent cycle, running or finished."""
        return self.cycles[-1] if self.cycles else None

    def begin(self, config_sha256: str, now: str | None = None) -> CycleState:
        """Starts a cycle, or resumes the running one if it ran the same config (else abandons it)."""
        running = self.current
        if running is not None and running.config_sha256 == config_sha256:
            return self
        cycles = self.cycles
        if running is not None:
            abandoned = running.model_copy(
                update={"status": "abandoned", "finished": now or utc_now(), "reason": "config changed"}
            )
            cycles = (*cycles[:-1], abandoned)
        number = cycles[-1].cycle + 1 if cycles else 1
        fresh = CycleRecord(cycle=number, config_sha256=config_sha256, started=now or utc_now())
        return self.model_copy(update={"cycles": (*cycles, fresh)})

    def decided(self, shard: str, sha256: str) -> ShardDecision | None:
        """The latest decision on this exact shard content, in this or any earlier cycle."""
        for record in reversed(self.cycles):
            for decision in reversed(record.shards):
                if decision.key == (shard, sha256):
                    return decision
        return None

    def decide(self, decisions: Iterable[ShardDecision]) -> CycleState:
        """Records shard decisions in the running cycle; a later decision on the same shard content replaces it."""
        running = self._running()
        merged = {d.key: d for d in running.shards}
        merged.update({d.key: d for d in decisions})
        return self._replace_current(running.model_copy(update={"shards": tuple(merged.values())}))

    def step_done(self, step: str, metrics: Mapping[str, float] | None = None) -> CycleState:
        """Marks a step of the running cycle complete, with the metrics it produced."""
        running = self._running()
        steps = running.steps if step in running.steps else (*running.steps, step)
        update = {"steps": steps, "metrics": {**running.metrics, **(metrics or {})}}
        return self._replace_current(running.model_copy(update=update))

    def accept(self, model: ModelRecord, heldout: HeldoutRecord, now: str | None = None) -> CycleState:
        """The gate accepted the candidate: it becomes the model the next cycle starts from."""
        running = self._running()
        done = running.model_copy(update={"status": "accepted", "finished": now or utc_now(), "candidate": model})
        return self._replace_current(done).model_copy(update={"accepted_model": model, "heldout": heldout})

    def reject(self, reason: str, now: str | None = None, candidate: ModelRecord | None = None) -> CycleState:
        """The gate refused the candidate: the last accepted model stays."""
        return self._finish("rejected", reason, now, candidate)

    def fail(self, reason: str, now: str | None = None) -> CycleState:
        """A check stopped the cycle (e.g. tampered data): nothing changes but the record of why."""
        return self._finish("failed", reason, now, None)

    def _finish(self, status: Status, reason: str, now: str | None, candidate: ModelRecord | None) -> CycleState:
        running = self._running()
        update = {"status": status, "finished": now or utc_now(), "reason": reason, "candidate": candidate}
        return self._replace_current(running.model_copy(update=update))

    def _running(self) -> CycleRecord:
        running = self.current
        if running is None:
            raise StateError("no cycle is running: call begin() first")
        return running

    def _replace_current(self, record: CycleRecord) -> CycleState:
        return self.model_copy(update={"cycles": (*self.cycles[:-1], record)})


def state_from_json(text: str | bytes, source: str = "<state>") -> CycleState:
    """Parses a persisted state; anything malformed is a StateError (never silently reset)."""
    try:
        return CycleState.model_validate_json(text)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "<root>"
        raise StateError(f"{source}: malformed cycle state at {where}: {first['msg']}", path=source) from None


def state_to_json(state: CycleState) -> str:
    return json.dumps(state.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


class StateStore:
    """The state file: atomic whole-file writes, and an exclusive lock so two cycles never interleave."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> CycleState:
        """The persisted state, or an empty one if the file does not exist yet."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return CycleState()
        except OSError as error:
            raise StateError(f"{self.path}: cannot read cycle state: {error.strerror}", path=str(self.path)) from None
        return state_from_json(data, str(self.path))

    def save(self, state: CycleState) -> None:
        """Writes the state so that a crash leaves either the old or the new file, never a torn one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as stream:
                stream.write(state_to_json(state))
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def update(self, state: CycleState) -> CycleState:
        """Saves and returns `state` (for `state = store.update(state.decide(...))`)."""
        self.save(state)
        return state

    @contextlib.contextmanager
    def locked(self) -> Iterator[StateStore]:
        """Holds an exclusive lock beside the state file; a second concurrent cycle fails at once."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with lock_path.open("a") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateError(f"{self.path}: another cycle holds the lock", path=str(self.path)) from None
            try:
                yield self
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
