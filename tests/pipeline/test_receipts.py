"""Signed receipts anchor the state's freshness outside it: a whole state put back (head and log) or another history
of the pipeline is refused, a planted receipt is ignored, and `--reinit` rebuilds a lost state without dropping
anti-rollback records or the accepted model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from trainguard.pipeline.cycle_state import CycleState, HeldoutRecord, ModelRecord, Pipeline, ShardDecision
from trainguard.pipeline.errors import ForeignStateError, StaleStateError, StateError
from trainguard.pipeline.receipts import check_fresh, rebuild_state, receipt_path, write_receipt
from trainguard.pipeline.state_log import StateStore
from trainguard.provenance.errors import RollbackError
from trainguard.provenance.keys import SigningKey, generate_signing_key

IDENTITY = ("digits", "work")
NAMESPACE = "ab" * 32 + "/digits-contributed"
MODEL = ModelRecord(path="work/models/cycle-0001", sha256="11" * 32)
HELDOUT = HeldoutRecord(manifest_sha256="cc" * 32, clean_accuracy=0.9)


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return generate_signing_key("ed25519")


def _finish(store: StateStore, state: CycleState, work: Path, version: int) -> CycleState:
    """One accepted cycle that accepts manifest `version`, with its signed receipt."""
    state = store.update(state.begin("c").accept_manifest(NAMESPACE, version, f"{version:02d}" * 32))
    decision = ShardDecision(shard="d:s", sha256="aa", source="alice", accepted=True, check="roni")
    state = store.update(state.decide([decision]).accept(MODEL, HELDOUT))
    write_receipt(work, state, store.link, "00" * 32, store.key)
    return state


def _project(tmp_path: Path, key: SigningKey, cycles: int) -> tuple[StateStore, CycleState, Path]:
    work = tmp_path / "work"
    store = StateStore(work / "state.json", key, IDENTITY)
    state = store.load()
    for version in range(1, cycles + 1):
        state = _finish(store, state, work, version)
    return store, state, work


def test_a_whole_state_put_back_is_refused_by_a_later_signed_receipt(tmp_path: Path, key: SigningKey) -> None:
    store, _, work = _project(tmp_path, key, 1)
    shutil.copytree(work, tmp_path / "snapshot")
    _finish(store, store.load(), work, 2)
    shutil.rmtree(work / "state-log")
    shutil.copy(tmp_path / "snapshot" / "state.json", work / "state.json")
    shutil.copytree(tmp_path / "snapshot" / "state-log", work / "state-log")

    replayed = StateStore(work / "state.json", key, IDENTITY)
    state = replayed.load()
    with pytest.raises(StaleStateError, match="cycle 2 ended at link"):
        check_fresh(state, replayed.link, work, key)


def test_a_planted_receipt_is_ignored(tmp_path: Path, key: SigningKey) -> None:
    store, state, work = _project(tmp_path, key, 1)
    receipt_path(work, 9999).write_text("")
    receipt_path(work, 12).write_bytes(b'{"payload": "", "payloadType": "x", "signatures": []}')
    forged = StateStore(tmp_path / "forger" / "state.json", generate_signing_key("ed25519"), IDENTITY)
    later = forged.update(forged.load().begin("c").begin("d").fail("x"))
    write_receipt(work, later, forged.link, "00" * 32, forged.key)  # cycle 2, signed by another key
    check_fresh(state, store.link, work, key)


def test_a_deleted_state_beside_signed_receipts_is_refused(tmp_path: Path, key: SigningKey) -> None:
    _, _, work = _project(tmp_path, key, 1)
    (work / "state.json").unlink()
    shutil.rmtree(work / "state-log")
    fresh = StateStore(work / "state.json", key, IDENTITY)
    with pytest.raises(StaleStateError, match="--reinit"):
        check_fresh(fresh.load(), fresh.link, work, key)


def test_another_history_of_the_pipeline_is_refused(tmp_path: Path, key: SigningKey) -> None:
    _, _, work = _project(tmp_path, key, 2)
    _project(tmp_path / "twin", key, 1)
    shutil.rmtree(work / "state-log")
    shutil.copy(tmp_path / "twin" / "work" / "state.json", work / "state.json")
    shutil.copytree(tmp_path / "twin" / "work" / "state-log", work / "state-log")
    foreign = StateStore(work / "state.json", key, IDENTITY)
    with pytest.raises(ForeignStateError, match="ran in history"):
        check_fresh(foreign.load(), foreign.link, work, key)


def test_reinit_keeps_the_rollback_records_and_the_accepted_model(tmp_path: Path, key: SigningKey) -> None:
    _, _, work = _project(tmp_path, key, 3)
    (work / "state.json").unlink()
    shutil.rmtree(work / "state-log")
    (work / "reports" / "cycle-0003.json").write_text("{}")

    rebuilt, carried = rebuild_state(StateStore(work / "state.json", key, IDENTITY), work)
    assert rebuilt.first_cycle == 4 and rebuilt.accepted_model == MODEL
    assert "1 anti-rollback record(s) kept" in carried
    with pytest.raises(RollbackError, match="older than accepted version 3"):
        rebuilt.accept_manifest(NAMESPACE, 2, "02" * 32)


def test_reinit_reads_rollback_records_from_the_log_past_the_last_receipt(tmp_path: Path, key: SigningKey) -> None:
    store, state, work = _project(tmp_path, key, 1)
    store.update(state.begin("c").accept_manifest(NAMESPACE, 5, "05" * 32))  # killed before its receipt
    (work / "state.json").unlink()

    rebuilt, _ = rebuild_state(StateStore(work / "state.json", key, IDENTITY), work)
    assert rebuilt.first_cycle == 3 and rebuilt.rollback[NAMESPACE].version == 5


def test_reinit_refuses_an_intact_state(tmp_path: Path, key: SigningKey) -> None:
    _, _, work = _project(tmp_path, key, 1)
    with pytest.raises(StateError, match="intact and current"):
        rebuild_state(StateStore(work / "state.json", key, IDENTITY), work)


def test_a_rebuilt_state_runs_on_and_its_receipts_are_current(tmp_path: Path, key: SigningKey) -> None:
    _, _, work = _project(tmp_path, key, 2)
    (work / "state.json").unlink()
    store = StateStore(work / "state.json", key, IDENTITY)
    rebuilt, _ = rebuild_state(store, work)
    state = _finish(store, rebuilt, work, 3)
    assert state.latest.cycle == 3 and state.pipeline != Pipeline.new(*IDENTITY)
    again = StateStore(work / "state.json", key, IDENTITY)
    check_fresh(again.load(), again.link, work, key)


def test_an_operators_rollback_reset_survives_a_rebuild(tmp_path: Path, key: SigningKey) -> None:
    store, state, work = _project(tmp_path, key, 2)
    store.update(state.reset_rollback(NAMESPACE, "the owner re-signs from scratch"))
    (work / "state.json").unlink()
    rebuilt, _ = rebuild_state(StateStore(work / "state.json", key, IDENTITY), work)
    assert NAMESPACE not in rebuilt.rollback
    rebuilt.accept_manifest(NAMESPACE, 1, "01" * 32)


def test_a_state_of_the_trainguard_before_the_chained_log_carries_its_records_over(
    tmp_path: Path, key: SigningKey
) -> None:
    import json

    from trainguard.pipeline.state_log import STATE_PAYLOAD_TYPE
    from trainguard.provenance.dsse import sign_envelope

    work = tmp_path / "work"
    work.mkdir()
    old = {
        "schema_version": 2,
        "first_cycle": 1,
        "accepted_model": MODEL.model_dump(),
        "heldout": HELDOUT.model_dump(),
        "rollback": {NAMESPACE: {"version": 4, "statement_sha256": "04" * 32}},
        "cycles": [{"cycle": 3, "config_sha256": "c", "status": "accepted", "started": "2026-01-01T00:00:00Z"}],
        "evidence": {},
    }
    (work / "state.json").write_bytes(sign_envelope(STATE_PAYLOAD_TYPE, json.dumps(old).encode(), key).to_json())
    store = StateStore(work / "state.json", key, IDENTITY)
    with pytest.raises(StateError, match="--reinit"):
        store.load()
    rebuilt, _ = rebuild_state(store, work)
    assert rebuilt.first_cycle == 4 and rebuilt.accepted_model == MODEL and rebuilt.rollback[NAMESPACE].version == 4
