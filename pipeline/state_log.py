"""The cycle state on disk: a signed, chained, append-only log of events and a small signed head.

Each event (`cycle_state.Event`) is one line of `<state>-log/cycle-NNNN.jsonl`, a DSSE envelope signed with the
cycle's key whose payload names the pipeline, its sequence number and the SHA-256 of the line before it. The head
(`state.json`) is a signed checkpoint: the state as of the newest line (summaries, anti-rollback records, the
accepted model) and the link it ends at. Saving appends the new events and rewrites the bounded head, so a cycle's
cost does not grow with history; loading reads the head and the segments of the cycles it still needs.

Loading refuses (numbered as the checks run):
1. a head whose signature does not verify with the cycle key (`tampered-state`);
2. a head of another pipeline: another config name or work folder (`foreign-state`);
3. a log that does not hold the head's link, or a line that does not verify or chain (`tampered-state`);
4. a head that is not the newest link: its log holds signed, chained events past it (`stale-state`). One event past
   it is what a crash between appending and rewriting the head leaves: that one is rolled forward.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from trainguard import strictjson
from trainguard.files import append_line, atomic_write, read_regular
from trainguard.pipeline.cycle_state import (
    SCHEMA_VERSION,
    CycleRecord,
    CycleState,
    Event,
    Pipeline,
    RollbackEntry,
    apply,
)
from trainguard.pipeline.errors import ForeignStateError, StaleStateError, StateError, TamperedStateError
from trainguard.pipeline.workdir import cycle_name, cycle_number
from trainguard.provenance.dsse import Envelope, sign_envelope, verify_envelope
from trainguard.provenance.errors import ProvenanceError
from trainguard.provenance.keys import SigningKey

STATE_PAYLOAD_TYPE = "application/vnd.trainguard.cycle-state+json"
ENTRY_PAYLOAD_TYPE = "application/vnd.trainguard.cycle-event+json"
HEAD_LIMIT = 64 * 1024 * 1024
SEGMENT_LIMIT = 8 * 1024 * 1024 * 1024
_HEAD_EXCLUDE: Any = {"pending": True, "reusable_shards": True, "evidence": True, "cycles": {"__all__": {"shards"}}}


@dataclass(frozen=True)
class Link:
    """One line of the log: its sequence number and the SHA-256 of its bytes."""

    seq: int
    digest: str


@dataclass(frozen=True)
class Chain:
    """Where a state stands in its pipeline's log: the newest link, and the last link of each segment it reads."""

    pipeline: str
    tip: Link
    ends: dict[int, Link] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "seq": self.tip.seq,
            "tip": self.tip.digest,
            "ends": {str(c): [link.seq, link.digest] for c, link in sorted(self.ends.items())},
        }

    @classmethod
    def from_json(cls, document: Any) -> Chain:
        ends = {int(c): Link(int(seq), str(digest)) for c, (seq, digest) in document["ends"].items()}
        return cls(str(document["pipeline"]), Link(int(document["seq"]), str(document["tip"])), ends)


@dataclass(frozen=True)
class Checkpoint:
    """A complete set of anti-rollback records as of one link of one history of the pipeline."""

    pipeline: str
    seq: int
    rollback: dict[str, RollbackEntry]


@dataclass(frozen=True)
class Entry:
    """A verified line of the log."""

    pipeline: str
    seq: int
    prev: str
    event: Event
    digest: str


def segment_number(name: str) -> int | None:
    """The cycle number of a segment file name, or None for any other name."""
    return cycle_number(name, ".jsonl")


class StateStore:
    """The signed cycle state of one pipeline: an exclusive lock so two cycles never interleave, a head rewritten
    atomically, and per-cycle segments appended line by line.

    Args:
        path: the head (`output.state_path`); the log is the folder beside it, `<stem>-log`.
        key: the cycle's key, which signs every line and the head.
        identity: the config's name and its work folder relative to the config's folder; a state made for
            another identity is refused.
    """

    def __init__(self, path: Path, key: SigningKey, identity: tuple[str, str] = ("pipeline", ".")) -> None:
        self.path = Path(path)
        self.key = key
        self.identity = identity
        self.log_dir = self.path.with_name(f"{self.path.stem}-log")
        self.chain: Chain | None = None

    def exists(self) -> bool:
        return self.path.exists() or self.path.is_symlink()

    def segment(self, cycle: int) -> Path:
        return self.log_dir / f"{cycle_name(cycle)}.jsonl"

    def segments(self) -> list[int]:
        """The cycle numbers of the segment files in the log folder (names only: their content is not read)."""
        if not self.log_dir.is_dir():
            return []
        return sorted(n for n in (segment_number(p.name) for p in self.log_dir.iterdir()) if n is not None)

    @property
    def link(self) -> Link | None:
        """The newest link written or loaded (None before the first save)."""
        return self.chain.tip if self.chain else None

    def load(self) -> CycleState:
        """The persisted state, checked as the module says; a new state of this identity (its genesis pending)
        when neither head nor log exists."""
        if not self.exists():
            if self.segments():
                raise StaleStateError(
                    f"{self.path}: the cycle state is missing but its log {self.log_dir} holds cycles (deleted "
                    "state); run `trainguard cycle --reinit` to rebuild it from the log and the signed receipts",
                    path=str(self.path),
                )
            self.chain = None
            return CycleState.genesis(Pipeline.new(*self.identity))
        state, chain = self._read_head()
        if state.pipeline is None or not state.pipeline.same_identity(*self.identity):
            made_for = f"{state.pipeline.name!r} at {state.pipeline.work_dir!r}" if state.pipeline else "no pipeline"
            raise ForeignStateError(
                f"{self.path}: the cycle state belongs to pipeline {made_for}, not {self.identity[0]!r} at "
                f"{self.identity[1]!r}: refusing another pipeline's state",
                path=str(self.path),
            )
        read: dict[int, list[Entry]] = {}  # each segment is read and verified once per load
        state, chain = self._roll_forward(state, chain, read)
        self.chain = chain
        return self._with_decisions(state, chain, read)

    def update(self, state: CycleState) -> CycleState:
        """Appends `state`'s pending events to the log, rewrites the head, and returns `state` with none pending
        (for `state = store.update(state.decide(...))`)."""
        if not state.pending:
            return state
        chain = self.chain
        for event in state.pending:
            if event.kind == "genesis":
                chain = Chain(event.body["pipeline"]["id"], Link(-1, ""))
            if chain is None:
                raise StateError(f"{self.path}: the first event of a state must be its genesis, not {event.kind}")
            chain = self._append(chain, event)
        assert chain is not None, "state.pending is not empty: the loop appended to a chain"
        saved = state.model_copy(update={"pending": ()})
        self.chain = _pruned(chain, saved)
        self._write_head(saved, self.chain)
        return saved

    def save(self, state: CycleState) -> None:
        """Writes `state`'s pending events and head (`update` without the return value)."""
        self.update(state)

    def history(self) -> list[CycleRecord]:
        """Every cycle of this pipeline's log, with its decisions, replayed from its first segment (reads it all)."""
        state = self.load()
        if self.chain is None or state.pipeline is None:
            return []
        records: list[CycleRecord] = []
        replayed = CycleState()
        previous = ""
        for cycle in range(state.first_cycle, max(self.chain.ends) + 1):
            for entry in self._read_segment(cycle, self.chain.pipeline, missing_ok=True):
                if entry.prev != previous:
                    raise TamperedStateError(
                        f"{self.segment(cycle)}: line {entry.seq} does not chain to the one before"
                    )
                previous = entry.digest
                replayed = apply(replayed, entry.event)
                if entry.event.kind in ("finish", "abandon") and replayed.latest is not None:
                    records.append(replayed.latest)
        if replayed.current is not None:
            records.append(replayed.current)
        return records

    def legacy(self) -> dict[str, Any] | None:
        """The state trainguard wrote before the chained log (schema 2: one signed document), when its signature
        verifies; a rebuild carries its anti-rollback records, accepted model and numbering over."""
        try:
            envelope = self._verified(
                read_regular(self.path, limit=HEAD_LIMIT, follow_symlinks=False), STATE_PAYLOAD_TYPE, self.path
            )
            document = strictjson.loads(envelope.payload)
        except (StateError, OSError, strictjson.StrictJSONError):
            return None
        return document if isinstance(document, dict) and document.get("schema_version") == 2 else None

    def salvage(self, checkpoints: Sequence[Checkpoint]) -> Checkpoint | None:
        """The anti-rollback records at the end of this identity's newest readable history, for a rebuild: from
        the latest complete set of them (`checkpoints`, e.g. signed receipts, newest history first, and a head that
        still verifies), then each rollback or reset event its log holds past that, in order."""
        candidates = list(checkpoints)
        with contextlib.suppress(StateError):
            state, chain = self._read_head()
            if state.pipeline is not None and state.pipeline.same_identity(*self.identity):
                candidates.append(Checkpoint(chain.pipeline, chain.tip.seq, dict(state.rollback)))
        lines: list[Entry] = []
        for cycle in self.segments():
            with contextlib.suppress(StateError):
                lines += self._read_segment(cycle, None)
        if not candidates:  # no complete set survives: the newest history of this identity, from its genesis
            geneses = [e for e in lines if e.event.kind == "genesis" and _of(e, self.identity)]
            candidates = [Checkpoint(e.pipeline, -1, {}) for e in geneses[-1:]]
        if not candidates:
            return None
        history = candidates[0].pipeline
        start = max((c for c in candidates if c.pipeline == history), key=lambda c: c.seq)
        records = dict(start.rollback)
        for entry in sorted((e for e in lines if e.pipeline == history and e.seq > start.seq), key=lambda e: e.seq):
            body = entry.event.body
            if entry.event.kind == "rollback":
                records[body["key"]] = RollbackEntry.model_validate({k: v for k, v in body.items() if k != "key"})
            elif entry.event.kind == "rollback-reset":
                records.pop(body["key"], None)
        return Checkpoint(history, max((e.seq for e in lines if e.pipeline == history), default=start.seq), records)

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

    def _append(self, chain: Chain, event: Event) -> Chain:
        seq = chain.tip.seq + 1
        payload = {"pipeline": chain.pipeline, "seq": seq, "prev": chain.tip.digest, "event": event.model_dump()}
        data = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        line = sign_envelope(ENTRY_PAYLOAD_TYPE, data, self.key).to_json(indent=None)
        path = self.segment(event.cycle)
        if event.cycle in chain.ends:
            append_line(path, line)
        else:  # this segment's first line: whatever a planted or torn file held at the name is replaced
            atomic_write(path, line + b"\n")
        link = Link(seq, hashlib.sha256(line).hexdigest())
        return replace(chain, tip=link, ends={**chain.ends, event.cycle: link})

    def _write_head(self, state: CycleState, chain: Chain) -> None:
        document = {
            "schema": SCHEMA_VERSION,
            "chain": chain.to_json(),
            "state": state.model_dump(mode="json", exclude=_HEAD_EXCLUDE),
        }
        data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        atomic_write(self.path, sign_envelope(STATE_PAYLOAD_TYPE, data, self.key).to_json())

    def _read_head(self) -> tuple[CycleState, Chain]:
        try:
            data = read_regular(self.path, limit=HEAD_LIMIT, follow_symlinks=False)
        except OSError as error:
            raise StateError(f"{self.path}: cannot read cycle state: {error.strerror}", path=str(self.path)) from None
        envelope = self._verified(data, STATE_PAYLOAD_TYPE, self.path)
        try:
            document = strictjson.loads(envelope.payload)
            if document.get("schema") != SCHEMA_VERSION:
                raise ValueError(
                    f"schema {document.get('schema', document.get('schema_version'))!r}, this trainguard reads "
                    f"{SCHEMA_VERSION} (`trainguard cycle --reinit` carries an earlier state's records over)"
                )
            return CycleState.model_validate(document["state"]), Chain.from_json(document["chain"])
        except ValidationError as error:
            first = error.errors(include_url=False)[0]
            where = ".".join(str(part) for part in first["loc"]) or "<root>"
            raise StateError(
                f"{self.path}: malformed cycle state at {where}: {first['msg']}", path=str(self.path)
            ) from None
        except (strictjson.StrictJSONError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise StateError(f"{self.path}: malformed cycle state: {error}", path=str(self.path)) from None

    def _verified(self, data: bytes, payload_type: str, where: Path) -> Envelope:
        try:
            envelope = Envelope.from_json(data)
            if envelope.payload_type != payload_type:
                raise StateError(f"{where}: not a trainguard {payload_type} (payloadType {envelope.payload_type!r})")
            verify_envelope(envelope, (self.key.public,), 1)
        except ProvenanceError as error:
            raise TamperedStateError(
                f"{where}: the cycle state does not carry a valid signature of the cycle key {self.key.keyid[:16]} "
                f"({error.reason}): it was edited outside trainguard or belongs to another key; refusing it",
                path=str(where),
            ) from None
        return envelope

    def _read_segment(self, cycle: int, pipeline: str | None, *, missing_ok: bool = False) -> list[Entry]:
        """The verified lines of one segment, each chained to the one before it and of `pipeline` (any, for None);
        a torn last line (a crash while appending) is dropped."""
        path = self.segment(cycle)
        try:
            data = read_regular(path, limit=SEGMENT_LIMIT, follow_symlinks=False)
        except FileNotFoundError:
            if missing_ok:
                return []
            raise TamperedStateError(f"{path}: the cycle state's log segment is missing", path=str(path)) from None
        except OSError as error:
            raise StateError(f"{path}: cannot read the cycle log: {error.strerror}", path=str(path)) from None
        entries: list[Entry] = []
        # Every line ends in a newline; what follows the last one was torn by a crash mid-append, never acknowledged.
        for line in data.split(b"\n")[:-1]:
            entry = self._entry(line, path)
            if pipeline is not None and entry.pipeline != pipeline:
                raise ForeignStateError(
                    f"{path}: line {entry.seq} belongs to pipeline {entry.pipeline}, not {pipeline}"
                )
            if entries and (entry.seq != entries[-1].seq + 1 or entry.prev != entries[-1].digest):
                raise TamperedStateError(f"{path}: line {entry.seq} does not chain to the one before", path=str(path))
            entries.append(entry)
        return entries

    def _entry(self, line: bytes, path: Path) -> Entry:
        envelope = self._verified(line, ENTRY_PAYLOAD_TYPE, path)
        try:
            document = strictjson.loads(envelope.payload)
            event = Event.model_validate(document["event"])
            return Entry(
                str(document["pipeline"]),
                int(document["seq"]),
                str(document["prev"]),
                event,
                hashlib.sha256(line).hexdigest(),
            )
        except (strictjson.StrictJSONError, ValidationError, KeyError, TypeError, ValueError) as error:
            raise StateError(f"{path}: malformed cycle log line: {error}", path=str(path)) from None

    def _roll_forward(self, state: CycleState, chain: Chain, read: dict[int, list[Entry]]) -> tuple[CycleState, Chain]:
        """Checks that the head is the newest link of its log (step 4), rolling forward the one event a crash can
        leave past it."""
        tail = max(chain.ends) if chain.ends else state.first_cycle
        entries = read[tail] = self._read_segment(tail, chain.pipeline)
        position = next(
            (i for i, e in enumerate(entries) if (e.seq, e.digest) == (chain.tip.seq, chain.tip.digest)), None
        )
        if position is None:
            raise TamperedStateError(
                f"{self.segment(tail)}: the log does not hold the state's newest link {chain.tip.seq} "
                "(edited or truncated log)",
                path=str(self.path),
            )
        after = entries[position + 1 :]
        following = self._continuation(tail + 1, chain.pipeline, (after[-1] if after else entries[position]).digest)
        if len(after) + len(following) > 1:
            raise StaleStateError(
                f"{self.path}: the cycle state ends at link {chain.tip.seq} (cycle {state.last_number}), but its "
                f"signed log goes on past it: an older or mid-cycle state was put back; refusing it",
                path=str(self.path),
            )
        for entry in (*after, *following):
            state = apply(state, entry.event)
            chain = replace(
                chain,
                tip=Link(entry.seq, entry.digest),
                ends={**chain.ends, entry.event.cycle: Link(entry.seq, entry.digest)},
            )
        return state, chain

    def _continuation(self, cycle: int, pipeline: str, tip: str) -> list[Entry]:
        """The lines of the next cycle's segment when they verify and chain to `tip`; anything else found at that
        name (planted, another pipeline's, torn) is not this history and is ignored (the next cycle replaces it)."""
        try:
            entries = self._read_segment(cycle, pipeline, missing_ok=True)
        except StateError:
            return []
        return entries if entries and entries[0].prev == tip else []

    def _with_decisions(self, state: CycleState, chain: Chain, read: dict[int, list[Entry]]) -> CycleState:
        """The head's state with what it leaves in the log: the latest cycle's decisions, the last screened
        cycle's decisions and the sources' evidence, each read from a segment bound to the head's links."""
        decided: dict[int, dict[str, Any]] = {}

        def bound(cycle: int) -> list[Entry]:
            end = chain.ends.get(cycle)
            if cycle not in read:
                read[cycle] = self._read_segment(cycle, chain.pipeline)
            kept = [e for e in read[cycle] if end is not None and e.seq <= end.seq]
            if end is None or not kept or (kept[-1].seq, kept[-1].digest) != (end.seq, end.digest):
                raise TamperedStateError(
                    f"{self.segment(cycle)}: the log segment does not end where the cycle state says",
                    path=str(self.path),
                )
            return kept

        def decisions(cycle: int) -> dict[str, Any]:
            if cycle not in decided:
                decided[cycle] = _decisions(bound(cycle), cycle)
            return decided[cycle]

        latest = state.latest
        if latest is not None:
            update = decisions(latest.cycle)
            state = state.model_copy(update={"cycles": (*state.cycles[:-1], latest.model_copy(update=update))})
        if state.reusable is not None:
            state = state.model_copy(update={"reusable_shards": decisions(state.reusable)["shards"]})
        if state.evidence_cycle is not None:
            last = [e for e in bound(state.evidence_cycle) if e.event.kind == "evidence"]
            if last:
                state = apply(state, last[-1].event)
        return state


def _of(entry: Entry, identity: tuple[str, str]) -> bool:
    """Whether a genesis line starts a history of `identity`."""
    return Pipeline.model_validate(entry.event.body["pipeline"]).same_identity(*identity)


def _decisions(entries: list[Entry], cycle: int) -> dict[str, Any]:
    """The decisions of `cycle` its segment's entries record, merged as `decide` merges them (`shards` update)."""
    replayed = CycleState(cycles=(CycleRecord(cycle=cycle, config_sha256="", started=""),))
    for entry in entries:
        if entry.event.kind == "decide" and entry.event.cycle == cycle:
            replayed = apply(replayed, entry.event)
    return {"shards": replayed.cycles[-1].shards}


def _pruned(chain: Chain, state: CycleState) -> Chain:
    """The chain keeping the segment ends the state still reads (tail, latest, reusable, evidence)."""
    needed = {max(chain.ends), state.reusable, state.evidence_cycle, state.latest.cycle if state.latest else None}
    return replace(chain, ends={c: link for c, link in chain.ends.items() if c in needed})
