"""The state kept across retraining cycles: the pipeline it belongs to, the last accepted model and its held-out
record, the shard decisions, the anti-rollback records of the manifests the cycles accepted and each source's RONI
evidence.

Every change is an `Event` (begin a cycle, decide shards, accept a manifest version, ...) applied by one pure
function, `apply`; the transitions (`CycleState.begin`, `.decide`, `.accept`, ...) build the event, apply it and
keep it as `pending`, so storage (`trainguard.pipeline.state_log.StateStore`) appends exactly those events to the
signed, chained log instead of re-signing the whole history. A process killed mid-cycle leaves a `running` cycle
holding every decision made so far; re-running the same config resumes it (decided shards are not re-screened), a
changed config abandons it and starts afresh. A rejected or failed cycle never touches the last accepted model.

The state held in memory is bounded by one cycle, not by history: summaries of the last `RECENT` cycles, the
decisions of the running cycle and of the last screened one (`reusable`), and the evidence of shards still offered.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainguard.pipeline.errors import StateError
from trainguard.provenance.rollback import Accepted, RollbackRecords

SCHEMA_VERSION: Final = 3
RECENT = 50
"""How many cycle summaries the state keeps (for `status` and the cycles plot); older ones stay in the log."""
Status = Literal["running", "accepted", "rejected", "failed", "abandoned"]
EventKind = Literal[
    "genesis",
    "begin",
    "abandon",
    "decide",
    "manifests",
    "rollback",
    "rollback-reset",
    "step",
    "evidence",
    "finish",
    "source",
]
SourceAction = Literal["clear", "quarantine", "release"]


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ShardDecision(_Record):
    """Whether one shard (by identity and content digest) may be trained on, which check decided, and why."""

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
    """One cycle. Its `shards` are held for the latest cycle only (and the last screened one's as the state's
    `reusable_shards`); the log has all."""

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
    """The highest manifest version accepted in one (key-set name, dataset) namespace, its statement digest, and
    every key that key set held when it recorded (so its records are found again after a rename)."""

    version: int = Field(ge=0)
    statement_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    keyids: tuple[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")], ...] = ()


class SourceEvidence(_Record):
    """A source's RONI p-values, one per shard content (sha256) still offered, so a source whose shards are each
    slightly harmful accumulates evidence instead of starting afresh every cycle."""

    p_values: dict[str, Annotated[float, Field(gt=0.0, le=1.0)]] = Field(default_factory=dict)


class Pipeline(_Record):
    """Which pipeline a state belongs to: a random id fixed at its first cycle (or `--reinit`), and the identity of
    the config it was made for (its `name` and its work folder relative to the config's folder)."""

    id: str = Field(pattern=r"^[0-9a-f]{32}$")
    name: str
    work_dir: str

    @classmethod
    def new(cls, name: str, work_dir: str) -> Pipeline:
        return cls(id=uuid.uuid4().hex, name=name, work_dir=work_dir)

    def same_identity(self, name: str, work_dir: str) -> bool:
        return (self.name, self.work_dir) == (name, work_dir)


class Event(_Record):
    """One change of the state, as the log records it."""

    kind: EventKind
    cycle: int = Field(ge=0)
    body: dict[str, Any] = Field(default_factory=dict)


class CycleState(_Record):
    """Everything decided so far that the next cycle needs. `first_cycle` is where numbering starts: past every
    cycle released before a state is re-initialised. `pending` holds the events not yet written to the log."""

    schema_version: Literal[3] = SCHEMA_VERSION
    pipeline: Pipeline | None = None
    first_cycle: int = Field(default=1, ge=1)
    accepted_model: ModelRecord | None = None
    heldout: HeldoutRecord | None = None
    rollback: dict[str, RollbackEntry] = Field(default_factory=dict)
    cycles: tuple[CycleRecord, ...] = ()
    reusable: int | None = Field(default=None, description="the last screened cycle, whose decisions are reused")
    reusable_shards: tuple[ShardDecision, ...] = ()
    evidence: dict[str, SourceEvidence] = Field(default_factory=dict)
    evidence_cycle: int | None = None
    cleared: tuple[str, ...] = Field(default=(), description="sources the operator cleared since the last screening")
    quarantined: dict[str, str] = Field(default_factory=dict, description="source -> why the operator quarantined it")
    pending: tuple[Event, ...] = ()

    @classmethod
    def genesis(
        cls,
        pipeline: Pipeline,
        first_cycle: int = 1,
        rollback: Mapping[str, RollbackEntry] | None = None,
        accepted_model: ModelRecord | None = None,
        heldout: HeldoutRecord | None = None,
    ) -> CycleState:
        """A new state of `pipeline`, numbering from `first_cycle`, keeping what a re-initialisation carries over:
        the anti-rollback records and the model the next cycle starts from."""
        body = {
            "pipeline": pipeline.model_dump(),
            "first_cycle": first_cycle,
            "rollback": {k: e.model_dump() for k, e in (rollback or {}).items()},
            "accepted_model": accepted_model.model_dump() if accepted_model else None,
            "heldout": heldout.model_dump() if heldout else None,
        }
        return cls()._record("genesis", first_cycle, body)

    def earlier_evidence(self, exclude: Iterable[str] = ()) -> dict[str, list[float]]:
        """Each source's recorded p-values, leaving out the shard digests in `exclude` (those being judged now)."""
        skip = set(exclude)
        return {
            source: [p for digest, p in record.p_values.items() if digest not in skip]
            for source, record in self.evidence.items()
        }

    def record_evidence(self, p_values: Iterable[tuple[str, str, float]], offered: Iterable[str]) -> CycleState:
        """Adds (source, shard sha256, p-value) triples and drops the p-values of shards no longer `offered` (by
        sha256): a withdrawn shard's evidence leaves the combination; the same content tested again keeps its
        latest p-value."""
        keep = set(offered)
        evidence = {
            source: {d: p for d, p in record.p_values.items() if d in keep} for source, record in self.evidence.items()
        }
        for source, digest, p in p_values:
            evidence.setdefault(source, {})[digest] = p
        body = {"evidence": {source: ps for source, ps in sorted(evidence.items()) if ps}}
        return self._record("evidence", self._running().cycle, body)

    @property
    def rollback_records(self) -> RollbackRecords:
        """The anti-rollback records, for manifest verification."""
        return RollbackRecords(
            {k: Accepted(e.version, e.statement_sha256, frozenset(e.keyids)) for k, e in self.rollback.items()}
        )

    def accept_manifest(self, key: str, version: int, statement_sha256: str, keyids: Iterable[str] = ()) -> CycleState:
        """Records a manifest as accepted in its rollback namespace by a key set of `keyids` (refusing a
        rollback)."""
        held = tuple(
            sorted(self.rollback_records.recorded(key, version, statement_sha256, keyids).accepted[key].keyids)
        )
        entry = self.rollback.get(key)
        if entry is not None and (entry.version, entry.statement_sha256, entry.keyids) == (
            version,
            statement_sha256,
            held,
        ):
            return self
        body = {"key": key, "version": version, "statement_sha256": statement_sha256, "keyids": list(held)}
        return self._record("rollback", self.tail_cycle, body)

    def reset_rollback(self, key: str, reason: str) -> CycleState:
        """Forgets one namespace's anti-rollback record: an operator's explicit, logged decision to go back."""
        if key not in self.rollback:
            raise StateError(
                f"no anti-rollback record {key!r} (recorded: {', '.join(sorted(self.rollback)) or 'none'})"
            )
        return self._record("rollback-reset", self.tail_cycle, {"key": key, "reason": reason, "at": utc_now()})

    def operate_source(self, source: str, action: SourceAction, reason: str) -> CycleState:
        """An operator's signed decision on a source, between cycles: `clear` forgets its evidence and earlier
        verdicts so the next cycle screens its shards afresh; `quarantine` refuses every shard of it until
        `release`, which also clears it."""
        if self.current is not None:
            raise StateError(f"cycle {self.current.cycle} is running; act on sources between cycles")
        if action == "release" and source not in self.quarantined:
            raise StateError(
                f"source {source!r} is not quarantined (quarantined: {', '.join(self.quarantined) or 'none'})"
            )
        body = {"source": source, "action": action, "reason": reason, "at": utc_now()}
        state = self._record("source", self.tail_cycle, body)
        if action == "quarantine" or source not in self.evidence:
            return state
        kept = {k: dict(v.p_values) for k, v in sorted(self.evidence.items()) if k != source}
        return state._record("evidence", self.tail_cycle, {"evidence": kept})

    @property
    def last_number(self) -> int:
        """The number of the latest cycle, or the one before `first_cycle` when none ran."""
        return self.cycles[-1].cycle if self.cycles else self.first_cycle - 1

    @property
    def tail_cycle(self) -> int:
        """The cycle whose log segment an event outside any cycle's work goes to: the latest, else the first."""
        return max(self.last_number, self.first_cycle)

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
        state = self
        if running is not None:
            body = {"finished": now or utc_now(), "reason": "config changed"}
            state = state._record("abandon", running.cycle, body)
        return state._record(
            "begin", state.last_number + 1, {"config_sha256": config_sha256, "started": now or utc_now()}
        )

    def decided(self, shard: str, sha256: str) -> ShardDecision | None:
        """The latest decision on this exact shard content, in the running cycle or the last screened one."""
        for shards in (self.current.shards if self.current else (), self.reusable_shards):
            for decision in reversed(shards):
                if decision.key == (shard, sha256) and decision.source not in self.cleared:
                    return decision
        return None

    def decide(self, decisions: Iterable[ShardDecision]) -> CycleState:
        """Records shard decisions in the running cycle; a later decision on the same shard content replaces it."""
        shards = [d.model_dump() for d in decisions]
        return self._record("decide", self._running().cycle, {"shards": shards}) if shards else self

    def read_manifests(self, digests: Mapping[str, str]) -> CycleState:
        """Records which manifests (path -> sha256) the running cycle verified and trains from."""
        return self._record("manifests", self._running().cycle, {"manifests": dict(digests)})

    def step_done(self, step: str, metrics: Mapping[str, float] | None = None) -> CycleState:
        """Marks a step of the running cycle complete, with the metrics it produced."""
        return self._record("step", self._running().cycle, {"step": step, "metrics": dict(metrics or {})})

    def accept(self, model: ModelRecord, heldout: HeldoutRecord, now: str | None = None) -> CycleState:
        """The gate accepted the candidate: it becomes the model the next cycle starts from."""
        return self._finish("accepted", "", now, model, heldout)

    def reject(self, reason: str, now: str | None = None, candidate: ModelRecord | None = None) -> CycleState:
        """The gate refused the candidate: the last accepted model stays."""
        return self._finish("rejected", reason, now, candidate, None)

    def fail(self, reason: str, now: str | None = None) -> CycleState:
        """A check stopped the cycle (e.g. tampered data): nothing changes but the record of why."""
        return self._finish("failed", reason, now, None, None)

    def _finish(
        self, status: Status, reason: str, now: str | None, candidate: ModelRecord | None, heldout: HeldoutRecord | None
    ) -> CycleState:
        body = {
            "status": status,
            "finished": now or utc_now(),
            "reason": reason,
            "candidate": candidate.model_dump() if candidate else None,
            "heldout": heldout.model_dump() if heldout else None,
        }
        return self._record("finish", self._running().cycle, body)

    def _running(self) -> CycleRecord:
        running = self.current
        if running is None:
            raise StateError("no cycle is running: call begin() first")
        return running

    def _record(self, kind: EventKind, cycle: int, body: dict[str, Any]) -> CycleState:
        event = Event(kind=kind, cycle=cycle, body=body)
        return apply(self, event).model_copy(update={"pending": (*self.pending, event)})


def apply(state: CycleState, event: Event) -> CycleState:
    """The state after `event`: the one definition of every transition, for new events and for the log replayed."""
    try:
        return _APPLY[event.kind](state, event)
    except (ValidationError, KeyError, TypeError) as error:
        raise StateError(f"malformed {event.kind} event of cycle {event.cycle}: {error}") from None


def _genesis(state: CycleState, event: Event) -> CycleState:
    body = event.body
    return CycleState(
        pipeline=Pipeline.model_validate(body["pipeline"]),
        first_cycle=body["first_cycle"],
        rollback={k: RollbackEntry.model_validate(v) for k, v in body["rollback"].items()},
        accepted_model=ModelRecord.model_validate(body["accepted_model"]) if body["accepted_model"] else None,
        heldout=HeldoutRecord.model_validate(body["heldout"]) if body["heldout"] else None,
    )


def _begin(state: CycleState, event: Event) -> CycleState:
    record = CycleRecord(cycle=event.cycle, config_sha256=event.body["config_sha256"], started=event.body["started"])
    earlier = tuple(c.model_copy(update={"shards": ()}) if c.shards else c for c in state.cycles)
    return state.model_copy(update={"cycles": (*earlier, record)[-RECENT:]})


def _abandon(state: CycleState, event: Event) -> CycleState:
    running = state._running()
    update = {"status": "abandoned", "finished": event.body["finished"], "reason": event.body["reason"]}
    return _replace_current(state, running.model_copy(update=update))


def _decide(state: CycleState, event: Event) -> CycleState:
    running = state._running()
    merged = {d.key: d for d in running.shards}
    merged.update({d.key: d for d in (ShardDecision.model_validate(s) for s in event.body["shards"])})
    return _replace_current(state, running.model_copy(update={"shards": tuple(merged.values())}))


def _manifests(state: CycleState, event: Event) -> CycleState:
    running = state._running()
    return _replace_current(state, running.model_copy(update={"manifests": dict(event.body["manifests"])}))


def _rollback(state: CycleState, event: Event) -> CycleState:
    body = event.body
    state.rollback_records.check(body["key"], body["version"], body["statement_sha256"])
    entry = RollbackEntry.model_validate({k: v for k, v in body.items() if k != "key"})
    return state.model_copy(update={"rollback": {**state.rollback, body["key"]: entry}})


def _rollback_reset(state: CycleState, event: Event) -> CycleState:
    return state.model_copy(update={"rollback": {k: e for k, e in state.rollback.items() if k != event.body["key"]}})


def _step(state: CycleState, event: Event) -> CycleState:
    running = state._running()
    step = event.body["step"]
    steps = running.steps if step in running.steps else (*running.steps, step)
    update = {"steps": steps, "metrics": {**running.metrics, **event.body["metrics"]}}
    return _replace_current(state, running.model_copy(update=update))


def _evidence(state: CycleState, event: Event) -> CycleState:
    evidence = {source: SourceEvidence(p_values=ps) for source, ps in event.body["evidence"].items()}
    return state.model_copy(update={"evidence": evidence, "evidence_cycle": event.cycle})


def _finish(state: CycleState, event: Event) -> CycleState:
    body = event.body
    running = state._running()
    candidate = ModelRecord.model_validate(body["candidate"]) if body["candidate"] else None
    update = {"status": body["status"], "finished": body["finished"], "reason": body["reason"], "candidate": candidate}
    done = running.model_copy(update=update)
    changes: dict[str, Any] = {}
    if body["status"] == "accepted":
        changes.update(accepted_model=candidate, heldout=HeldoutRecord.model_validate(body["heldout"]))
    if body["status"] in ("accepted", "rejected"):
        changes.update(reusable=done.cycle, reusable_shards=done.shards, cleared=())
    return _replace_current(state, done).model_copy(update=changes)


def _source(state: CycleState, event: Event) -> CycleState:
    source, action = event.body["source"], event.body["action"]
    quarantined = {k: v for k, v in state.quarantined.items() if k != source}
    if action == "quarantine":
        quarantined[source] = event.body["reason"]
    cleared = state.cleared if action == "quarantine" or source in state.cleared else (*state.cleared, source)
    return state.model_copy(update={"quarantined": quarantined, "cleared": cleared})


def _replace_current(state: CycleState, record: CycleRecord) -> CycleState:
    return state.model_copy(update={"cycles": (*state.cycles[:-1], record)})


_APPLY = {
    "genesis": _genesis,
    "begin": _begin,
    "abandon": _abandon,
    "decide": _decide,
    "manifests": _manifests,
    "rollback": _rollback,
    "rollback-reset": _rollback_reset,
    "step": _step,
    "evidence": _evidence,
    "finish": _finish,
    "source": _source,
}
