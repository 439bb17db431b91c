"""Signed receipts of finished cycles: where each cycle left the state's signed history, beside its report.

A receipt (`reports/cycle-NNNN.receipt.json`, a DSSE envelope signed with the cycle's key) names the pipeline, the
cycle, its outcome, the state's newest link at the end of the cycle, the report's digest and the records the next
cycle must not lose (anti-rollback, the accepted model). Receipts are what a state put back whole (head and log
together) is measured against, and what `trainguard cycle --reinit` rebuilds a lost state from. Only a receipt whose
signature verifies counts: a file planted under a receipt's name is ignored, never believed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainguard import strictjson
from trainguard.files import atomic_write, read_regular
from trainguard.pipeline.cycle_state import CycleState, HeldoutRecord, ModelRecord, Pipeline, RollbackEntry
from trainguard.pipeline.errors import ForeignStateError, StaleStateError, StateError
from trainguard.pipeline.state_log import Checkpoint, Link, StateStore
from trainguard.pipeline.workdir import RECEIPT_SUFFIX, WorkDir, cycle_number
from trainguard.provenance.dsse import Envelope, sign_envelope, verify_envelope
from trainguard.provenance.errors import ProvenanceError
from trainguard.provenance.keys import SigningKey

RECEIPT_PAYLOAD_TYPE = "application/vnd.trainguard.cycle-receipt+json"
RECEIPT_LIMIT = 16 * 1024 * 1024


class Receipt(BaseModel):
    """What one finished cycle left: its outcome, the state's newest link and what the next cycle needs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pipeline: Pipeline
    cycle: int = Field(ge=1)
    status: str
    seq: int = Field(ge=0)
    link: str = Field(pattern=r"^[0-9a-f]{64}$")
    report_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    rollback: dict[str, RollbackEntry] = Field(default_factory=dict)
    accepted_model: ModelRecord | None = None
    heldout: HeldoutRecord | None = None


def receipt_path(work_dir: Path, cycle: int) -> Path:
    return WorkDir(work_dir).receipt(cycle)


def write_receipt(work_dir: Path, state: CycleState, link: Link, report_sha256: str, key: SigningKey) -> Path:
    """Signs and writes the receipt of `state`'s latest cycle, ended at `link`."""
    latest = state.latest
    if state.pipeline is None or latest is None:
        raise ValueError("a receipt needs a pipeline and a cycle")
    receipt = Receipt(
        pipeline=state.pipeline,
        cycle=latest.cycle,
        status=latest.status,
        seq=link.seq,
        link=link.digest,
        report_sha256=report_sha256,
        rollback=state.rollback,
        accepted_model=state.accepted_model,
        heldout=state.heldout,
    )
    data = json.dumps(receipt.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()
    path = receipt_path(work_dir, latest.cycle)
    atomic_write(path, sign_envelope(RECEIPT_PAYLOAD_TYPE, data, key).to_json())
    return path


def receipts(work_dir: Path, key: SigningKey, identity: tuple[str, str], *, since: int = 0) -> Iterator[Receipt]:
    """The valid receipts of this identity (any history of it) numbered `since` or later, newest first; the
    highest-numbered valid one always comes first, even when older than `since`."""
    folder = WorkDir(work_dir).reports
    names = sorted(
        (
            (n, p)
            for p in (folder.iterdir() if folder.is_dir() else ())
            if (n := cycle_number(p.name, RECEIPT_SUFFIX)) is not None
        ),
        reverse=True,
    )
    first = True
    for number, path in names:
        if number < since and not first:
            return
        receipt = _read(path, key)
        if receipt is not None and receipt.pipeline.same_identity(*identity):
            first = False
            yield receipt


def check_fresh(state: CycleState, link: Link | None, work_dir: Path, key: SigningKey) -> None:
    """Refuses a state that a signed receipt beside it shows to be older than its own history (`stale-state`), or
    another history of this pipeline (`foreign-state`)."""
    pipeline = state.pipeline
    if pipeline is None:
        return
    identity = (pipeline.name, pipeline.work_dir)
    for receipt in receipts(work_dir, key, identity, since=state.last_number):
        if receipt.pipeline.id != pipeline.id and (link is None or receipt.cycle >= state.first_cycle):
            where = "there is no cycle state" if link is None else f"the cycle state is history {pipeline.id[:8]}"
            raise (StaleStateError if link is None else ForeignStateError)(
                f"{receipt_path(work_dir, receipt.cycle)}: cycle {receipt.cycle} ran in history "
                f"{receipt.pipeline.id[:8]} of this pipeline, but {where}: a deleted or foreign state; "
                "`trainguard cycle --reinit` rebuilds it from the signed log and receipts",
                path=str(work_dir),
            )
        if link is not None and receipt.pipeline.id == pipeline.id and receipt.seq > link.seq:
            raise StaleStateError(
                f"{receipt_path(work_dir, receipt.cycle)}: cycle {receipt.cycle} ended at link {receipt.seq} of the "
                f"signed history, but the cycle state ends at link {link.seq} (cycle {state.last_number}): an older "
                "or mid-cycle state was put back; refusing it",
                path=str(work_dir),
            )


def _read(path: Path, key: SigningKey) -> Receipt | None:
    """The receipt at `path`, or None when it is not one signed by `key` (planted, torn, another key's)."""
    try:
        envelope = Envelope.from_json(read_regular(path, limit=RECEIPT_LIMIT, follow_symlinks=False))
        if envelope.payload_type != RECEIPT_PAYLOAD_TYPE:
            return None
        verify_envelope(envelope, (key.public,), 1)
        return Receipt.model_validate(strictjson.loads(envelope.payload))
    except (OSError, ProvenanceError, strictjson.StrictJSONError, ValidationError):
        return None


def rebuild_state(store: StateStore, work_dir: Path) -> tuple[CycleState, str]:
    """A new history of the store's pipeline for `trainguard cycle --reinit`, where the state is missing, stale,
    foreign or unreadable: numbered after every cycle found, keeping the anti-rollback records of the newest history
    (its newest signed receipt or verifiable head, then the events its signed log holds past that) and the last
    accepted model. Returns it (its genesis pending) and a line saying what it carried; refuses when the state is
    intact."""
    try:
        current = store.load()
        check_fresh(current, store.link, work_dir, store.key)
    except StateError:
        pass
    else:
        if store.link is not None:
            raise StateError(f"{store.path}: the cycle state is intact and current; --reinit only rebuilds a lost one")
    found = list(receipts(work_dir, store.key, store.identity))
    legacy = _legacy(store) if not found else None
    if legacy is not None:  # a state of the trainguard before receipts: its records and model carry over
        found = [legacy]
    salvaged = store.salvage([Checkpoint(r.pipeline.id, r.seq, dict(r.rollback)) for r in found])
    rollback = salvaged.rollback if salvaged else {}
    numbers = [r.cycle for r in found] + store.segments()
    numbers += [n for p in WorkDir(work_dir).models.glob("cycle-*") if (n := cycle_number(p.name)) is not None]
    newest = found[0] if found else None
    state = CycleState.genesis(
        Pipeline.new(*store.identity),
        first_cycle=max(numbers, default=0) + 1,
        rollback=rollback,
        accepted_model=newest.accepted_model if newest else None,
        heldout=newest.heldout if newest else None,
    )
    carried = (
        f"re-initialised the cycle state from {len(found)} signed receipt(s) and its log: numbering from cycle "
        f"{state.first_cycle}, {len(rollback)} anti-rollback record(s) kept, starting model "
        f"{state.accepted_model.path if state.accepted_model else 'none'}"
    )
    return state, carried


def _legacy(store: StateStore) -> Receipt | None:
    """A schema-2 state (one signed document, before the chained log) read as the receipt of its last cycle."""
    document = store.legacy()
    if document is None:
        return None
    try:
        cycles = document.get("cycles") or []
        return Receipt(
            pipeline=Pipeline.new(*store.identity),
            cycle=max([c["cycle"] for c in cycles], default=document.get("first_cycle", 1) - 1) or 1,
            status=cycles[-1]["status"] if cycles else "none",
            seq=0,
            link="0" * 64,
            report_sha256="0" * 64,
            rollback=document.get("rollback") or {},
            accepted_model=document.get("accepted_model"),
            heldout=document.get("heldout"),
        )
    except (ValidationError, KeyError, TypeError):
        return None
