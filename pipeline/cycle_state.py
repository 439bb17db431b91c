"""The state kept across retraining cycles: the last accepted model, its held-out record, every shard decision,
the anti-rollback records of the manifests the cycles accepted and each source's RONI evidence.

Pure transitions on immutable values (`CycleState.begin`, `.decide`, `.accept`, ...) are separate from storage
(`StateStore`), which writes the whole state atomically after each decision, as a DSSE envelope signed with the
cycle's key: an edited, forged or foreign state is refused, never believed. A process killed mid-cycle leaves a
`running` cycle holding every decision made so far; re-running the same config resumes it (decided shards are not
re-screened), a changed config abandons it and starts afresh. A rejected or failed cycle never touches the last
accepted model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainguard.files import atomic_write, read_regular
from trainguard.pipeline.errors import StateError, TamperedStateError
from trainguard.provenance.dsse import Envelope, sign_envelope, verify_envelope
from trainguard.provenance.errors import ProvenanceError
from trainguard.provenance.keys import SigningKey
from trainguard.provenance.rollback import Accepted, RollbackRecords

SCHEMA_VERSION = 2
STATE_PAYLOAD_TYPE = "application/vnd.trainguard.cycle-state+json"
STATE_LIMIT = 256 * 1024 * 1024
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
    manifests: dict[str, str] = Field(default_factory=dict, description="manifest path -> sha256 it verified")


class RollbackEntry(_Record):
    """The highest manifest version accepted in one (key set, dataset) namespace, and its statement digest."""

    version: int = Field(ge=0)
    statement_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class SourceEvidence(_Record):
    """A source's RONI p-values across cycles, one per shard content (sha256), so a source whose shards are each
    slightly harmful accumulates evidence instead of starting afresh every cycle."""

    p_values: dict[str, Annotated[float, Field(gt=0.0, le=1.0)]] = Field(default_factory=dict)


class CycleState(_Record):
    """Everything decided so far, across cycles. `first_cycle` is where numbering starts: past every released
    model and report when a state is re-initialised beside them."""

    schema_version: Literal[2] = SCHEMA_VERSION
    first_cycle: int = Field(default=1, ge=1)
    accepted_model: ModelRecord | None = None
    heldout: HeldoutRecord | None = None
    rollback: dict[str, RollbackEntry] = Field(default_factory=dict)
    cycles: tuple[CycleRecord, ...] = ()
    evidence: dict[str, SourceEvidence] = Field(default_factory=dict)

    def earlier_evidence(self, exclude: Iterable[str] = ()) -> dict[str, list[float]]:
        """Each source's recorded p-values, leaving out the shard digests in `exclude` (those being judged now)."""
        skip = set(exclude)
        return {
            source: [p for digest, p in record.p_values.items() if digest not in skip]
            for source, record in self.evidence.items()
        }

    def record_evidence(self, p_values: Iterable[tuple[str, str, float]]) -> CycleState:
        """Adds (source, shard sha256, p-value) triples; the same content tested again keeps its latest p-value."""
        evidence = {source: dict(record.p_values) for source, record in self.evidence.items()}
        for source, digest, p in p_values:
            evidence.setdefault(source, {})[digest] = p
        return self.model_copy(
            update={"evidence": {source: SourceEvidence(p_values=ps) for source, ps in evidence.items()}}
        )

    @property
    def rollback_records(self) -> RollbackRecords:
        """The anti-rollback records, for manifest verification."""
        return RollbackRecords({k: Accepted(e.version, e.statement_sha256) for k, e in self.rollback.items()})

    def accept_manifest(self, key: str, version: int, statement_sha256: str) -> CycleState:
        """Records a manifest as accepted in its rollback namespace (refusing a rollback)."""
        records = self.rollback_records.recorded(key, version, statement_sha256)
        entries = {
            k: RollbackEntry(version=a.version, statement_sha256=a.statement_sha256)
            for k, a in records.accepted.items()
        }
        return self.model_copy(update={"rollback": entries})

    @property
    def last_number(self) -> int:
        """The number of the latest cycle, or the one before `first_cycle` when none ran."""
        return self.cycles[-1].cycle if self.cycles else self.first_cycle - 1

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
        number = cycles[-1].cycle + 1 if cycles else self.first_cycle
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

    def read_manifests(self, digests: Mapping[str, str]) -> CycleState:
        """Records which manifests (path -> sha256) the running cycle verified and trains from."""
        running = self._running()
        return self._replace_current(running.model_copy(update={"manifests": dict(digests)}))

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
    """Parses a state's JSON; anything malformed is a StateError (never silently reset)."""
    from trainguard.strictjson import StrictJSONError, loads

    try:
        document = loads(text)
    except StrictJSONError as error:
        raise StateError(f"{source}: malformed cycle state: {error}", path=source) from None
    try:
        return CycleState.model_validate(document)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "<root>"
        raise StateError(f"{source}: malformed cycle state at {where}: {first['msg']}", path=source) from None


def state_to_json(state: CycleState) -> str:
    return json.dumps(state.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


class StateStore:
    """The state file, signed with the cycle's key: atomic whole-file writes, and an exclusive lock so two cycles
    never interleave."""

    def __init__(self, path: Path, key: SigningKey) -> None:
        self.path = Path(path)
        self.key = key

    def exists(self) -> bool:
        return self.path.exists() or self.path.is_symlink()

    def load(self) -> CycleState:
        """The persisted state (its signature checked), or an empty one if the file does not exist yet."""
        try:
            data = read_regular(self.path, limit=STATE_LIMIT, follow_symlinks=False)
        except FileNotFoundError:
            return CycleState()
        except OSError as error:
            raise StateError(f"{self.path}: cannot read cycle state: {error.strerror}", path=str(self.path)) from None
        try:
            envelope = Envelope.from_json(data)
            if envelope.payload_type != STATE_PAYLOAD_TYPE:
                raise StateError(f"{self.path}: not a trainguard cycle state (payloadType {envelope.payload_type!r})")
            verify_envelope(envelope, (self.key.public,), 1)
        except ProvenanceError as error:
            raise TamperedStateError(
                f"{self.path}: the cycle state does not carry a valid signature of the cycle key {self.key.keyid[:16]} "
                f"({error.reason}): it was edited outside trainguard or belongs to another key; refusing it",
                path=str(self.path),
            ) from None
        return state_from_json(envelope.payload, str(self.path))

    def save(self, state: CycleState) -> None:
        """Signs and writes the state so that a crash leaves either the old or the new file, never a torn one."""
        envelope = sign_envelope(STATE_PAYLOAD_TYPE, state_to_json(state).encode(), self.key)
        atomic_write(self.path, envelope.to_json())

    def update(self, state: CycleState) -> CycleState:
        """Saves and returns `state` (for `state = store.update(state.decide(...))`)."""
        self.save(state)
        return state

    @contextlib.contextmanager
    def locked(self) -> Iterator[StateStore]:
        """Holds an exclusive lock beside the state file; a second concurrent cycle fails at once."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise StateError(
                f"{lock_path}: cannot open the cycle lock: {error.strerror}", path=str(lock_path)
            ) from None
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateError(f"{self.path}: another cycle holds the lock", path=str(self.path)) from None
            yield self
        finally:
            os.close(lock)
