"""Cross-cycle state: decisions persist, a killed cycle resumes, a rejected cycle keeps the last accepted model; the
state is a signed, chained log with a signed head, refused when edited, forged, foreign, truncated or put back."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainguard.pipeline.cycle_state import (
    RECENT,
    CycleState,
    Event,
    HeldoutRecord,
    ModelRecord,
    Pipeline,
    ShardDecision,
    apply,
)
from trainguard.pipeline.errors import ForeignStateError, StaleStateError, StateError, TamperedStateError
from trainguard.pipeline.state_log import STATE_PAYLOAD_TYPE, StateStore
from trainguard.provenance.dsse import Envelope, sign_envelope
from trainguard.provenance.errors import RollbackError
from trainguard.provenance.keys import SigningKey, generate_signing_key, write_keypair

IDENTITY = ("digits", "demo-work/cycle")


@pytest.fixture(scope="module")
def key() -> SigningKey:
    """The cycle's key, which signs the state."""
    return generate_signing_key("ecdsa-p256")


def _store(path: Path, key: SigningKey, identity: tuple[str, str] = IDENTITY) -> StateStore:
    return StateStore(path, key, identity)


def _decision(name: str, accepted: bool = True, digest: str = "aa") -> ShardDecision:
    reason = "" if accepted else "RONI: held-out accuracy drops 0.120 > 0.030"
    return ShardDecision(shard=name, sha256=digest, source="alice", accepted=accepted, check="roni", reason=reason)


MODEL_1 = ModelRecord(path="cycle-1/model", sha256="11" * 32)
HELDOUT_1 = HeldoutRecord(manifest_sha256="cc" * 32, clean_accuracy=0.93, robust_accuracy={"0.1": 0.61})


def _cycles(store: StateStore, count: int, decisions: int = 3) -> CycleState:
    """Runs `count` accepted cycles of `decisions` shard decisions each through `store`."""
    state = store.load()
    for n in range(count):
        state = store.update(state.begin("c").decide([_decision(f"s{n}-{i}") for i in range(decisions)]))
        state = store.update(state.accept(MODEL_1, HELDOUT_1))
    return state


def test_an_accepted_cycle_becomes_the_starting_point_and_a_rejected_one_changes_nothing(
    tmp_path: Path, key: SigningKey
) -> None:
    store = _store(tmp_path / "state.json", key)
    state = store.update(store.load().begin("c1").decide([_decision("a.parquet")]))
    state = store.update(state.step_done("trained", {"val/acc": 0.93}).accept(MODEL_1, HELDOUT_1))
    state = store.update(state.begin("c1").decide([_decision("b.parquet", accepted=False)]))
    store.save(state.reject("gate: clean accuracy 0.71 < 0.85", candidate=ModelRecord(path="x", sha256="22" * 32)))

    loaded = _store(tmp_path / "state.json", key).load()
    assert loaded.accepted_model == MODEL_1 and loaded.heldout == HELDOUT_1
    assert [c.status for c in loaded.cycles] == ["accepted", "rejected"]
    assert loaded.current is None and loaded.latest.cycle == 2
    assert [c.cycle for c in loaded.cycles] == [1, 2]
    assert loaded.cycles[0].metrics == {"val/acc": 0.93}
    assert loaded.decided("b.parquet", "aa").reason.startswith("RONI")
    assert loaded.decided("b.parquet", "changed") is None


def test_a_cycle_killed_mid_way_resumes_with_its_decisions(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "state" / "state.json"
    private, _ = write_keypair(key, tmp_path / "keys" / "cycle")
    script = textwrap.dedent(f"""
        import os, signal
        from trainguard.pipeline.cycle_state import ShardDecision
        from trainguard.pipeline.state_log import StateStore
        from trainguard.provenance.keys import load_signing_key
        store = StateStore({str(path)!r}, load_signing_key({str(private)!r}), {IDENTITY!r})
        state = store.update(store.load().begin("cfg"))
        for i in range(3):
            state = store.update(state.decide([ShardDecision(shard=f"s{{i}}", sha256="d", source="bob",
                                                             accepted=i != 1, check="roni", reason="r")]))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr

    store = _store(path, key)
    resumed = store.load().begin("cfg")
    assert resumed.current is not None and resumed.current.cycle == 1
    assert [d.shard for d in resumed.current.shards] == ["s0", "s1", "s2"]
    assert resumed.decided("s1", "d").accepted is False
    assert sorted(p.name for p in path.parent.iterdir()) == ["state-log", "state.json"]

    redone = store.load().begin("changed-config")
    assert [c.status for c in redone.cycles] == ["abandoned", "running"]
    assert redone.current.shards == () and redone.current.cycle == 2


def test_a_later_decision_on_the_same_shard_replaces_the_earlier_one() -> None:
    state = CycleState().begin("c").decide([_decision("a")]).decide([_decision("a", accepted=False)])
    assert len(state.current.shards) == 1 and not state.current.shards[0].accepted


def test_transitions_without_a_running_cycle_are_refused() -> None:
    with pytest.raises(StateError, match="no cycle is running"):
        CycleState().decide([_decision("a")])
    finished = CycleState().begin("c").fail("tampered shard train/bob/s1.parquet")
    with pytest.raises(StateError):
        finished.accept(MODEL_1, HELDOUT_1)


def test_a_second_concurrent_cycle_is_refused(tmp_path: Path, key: SigningKey) -> None:
    store = _store(tmp_path / "state.json", key)
    with store.locked(), pytest.raises(StateError, match="another cycle holds the lock"), store.locked():
        pass
    with store.locked():
        pass


def test_a_corrupt_state_file_is_an_error_not_a_reset(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(sign_envelope(STATE_PAYLOAD_TYPE, b'{"schema": 3, "chain": {}, "state": []}', key).to_json())
    with pytest.raises(StateError, match=rf"{path}: malformed cycle state"):
        _store(path, key).load()


def test_an_edited_verdict_in_the_state_log_is_refused(tmp_path: Path, key: SigningKey) -> None:
    store = _store(tmp_path / "state.json", key)
    store.save(store.load().begin("c").decide([_decision("poison.parquet", accepted=False)]))
    segment = store.segment(1)
    lines = segment.read_bytes().splitlines()
    envelope = Envelope.from_json(lines[-1])
    edited = envelope.payload.replace(b'"accepted":false', b'"accepted":true')
    assert edited != envelope.payload
    lines[-1] = Envelope(envelope.payload_type, edited, envelope.signatures).to_json(indent=None)
    segment.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(TamperedStateError, match="edited outside trainguard") as refused:
        _store(store.path, key).load()
    assert refused.value.exit_code == 1


def test_an_edited_head_is_refused(tmp_path: Path, key: SigningKey) -> None:
    store = _store(tmp_path / "state.json", key)
    _cycles(store, 1)
    envelope = Envelope.from_json(store.path.read_bytes())
    edited = envelope.payload.replace(b'"version"', b'"versi0n"').replace(b"11111111", b"22222222", 1)
    assert edited != envelope.payload
    store.path.write_bytes(Envelope(envelope.payload_type, edited, envelope.signatures).to_json())
    with pytest.raises(TamperedStateError, match="edited outside trainguard"):
        _store(store.path, key).load()


def test_a_plain_json_state_is_refused_not_believed(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"schema": 3, "chain": {}, "state": {}}')
    with pytest.raises(TamperedStateError):
        _store(path, key).load()


def test_a_state_signed_by_another_key_is_refused(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "state.json"
    _store(path, generate_signing_key("ecdsa-p256")).save(CycleState.genesis(Pipeline.new(*IDENTITY)).begin("c"))
    with pytest.raises(TamperedStateError, match="valid signature of the cycle key"):
        _store(path, key).load()


def test_a_symlinked_state_file_is_refused(tmp_path: Path, key: SigningKey) -> None:
    real = tmp_path / "elsewhere.json"
    _store(real, key).save(CycleState.genesis(Pipeline.new(*IDENTITY)))
    (tmp_path / "state.json").symlink_to(real)
    with pytest.raises(StateError, match="symbolic link"):
        _store(tmp_path / "state.json", key).load()


def test_another_pipelines_state_sharing_the_cycle_key_is_refused(tmp_path: Path, key: SigningKey) -> None:
    store = _store(tmp_path / "state.json", key, ("other-pipeline", "other-work"))
    _cycles(store, 1)
    with pytest.raises(ForeignStateError, match="belongs to pipeline 'other-pipeline'") as refused:
        _store(store.path, key).load()
    assert refused.value.reason == "foreign-state"


def test_a_mid_cycle_state_put_back_after_the_cycle_finished_is_refused(tmp_path: Path, key: SigningKey) -> None:
    store = _store(tmp_path / "state.json", key)
    state = _cycles(store, 1)
    state = store.update(state.begin("c").decide([_decision("x")]))
    mid_cycle = store.path.read_bytes()
    state = store.update(state.accept_manifest("ab" * 32 + "/digits", 4, "11" * 32).decide([_decision("y")]))
    store.update(state.accept(MODEL_1, HELDOUT_1))

    store.path.write_bytes(mid_cycle)
    with pytest.raises(StaleStateError, match="signed log goes on past it") as refused:
        _store(store.path, key).load()
    assert refused.value.reason == "stale-state"


def test_a_finished_state_put_back_after_the_next_cycle_began_is_refused(tmp_path: Path, key: SigningKey) -> None:
    store = _store(tmp_path / "state.json", key)
    state = _cycles(store, 2)
    older = store.path.read_bytes()
    store.update(state.begin("c").decide([_decision("z")]))
    store.path.write_bytes(older)
    with pytest.raises(StaleStateError):
        _store(store.path, key).load()


def test_the_one_event_a_crash_leaves_past_the_head_is_rolled_forward(tmp_path: Path, key: SigningKey) -> None:
    store = _store(tmp_path / "state.json", key)
    state = _cycles(store, 1)
    state = store.update(state.begin("c"))
    head = store.path.read_bytes()
    store.update(state.decide([_decision("late")]))
    store.path.write_bytes(head)  # as if the process died after appending the event, before rewriting the head

    loaded = _store(store.path, key).load()
    assert loaded.decided("late", "aa") is not None


def test_a_truncated_log_is_refused(tmp_path: Path, key: SigningKey) -> None:
    store = _store(tmp_path / "state.json", key)
    state = _cycles(store, 1)
    store.update(state.begin("c").decide([_decision("a")]).decide([_decision("b")]))
    segment = store.segment(2)
    segment.write_bytes(b"".join(segment.read_bytes().splitlines(keepends=True)[:-1]))
    with pytest.raises(TamperedStateError, match="does not hold the state's newest link"):
        _store(store.path, key).load()


def test_a_deleted_head_beside_its_log_is_refused(tmp_path: Path, key: SigningKey) -> None:
    store = _store(tmp_path / "state.json", key)
    _cycles(store, 1)
    store.path.unlink()
    with pytest.raises(StaleStateError, match="--reinit"):
        _store(store.path, key).load()


def test_a_planted_file_at_the_next_segment_name_neither_stops_nor_enters_the_next_cycle(
    tmp_path: Path, key: SigningKey
) -> None:
    store = _store(tmp_path / "state.json", key)
    _cycles(store, 1)
    store.segment(2).write_text("")
    store.segment(3).write_text("not a log\n")
    fresh = _store(store.path, key)
    state = fresh.update(fresh.load().begin("c").decide([_decision("n")]))
    assert _store(store.path, key).load().current.shards == state.current.shards


def test_the_state_reads_a_bounded_part_of_its_history(tmp_path: Path, key: SigningKey) -> None:
    store = _store(tmp_path / "state.json", key)
    state = _cycles(store, RECENT + 5)
    assert len(state.cycles) == RECENT
    head_size = store.path.stat().st_size
    _cycles(store, 5)
    assert store.path.stat().st_size <= head_size * 1.05
    for cycle in store.segments()[:-2]:
        store.segment(cycle).unlink()  # old segments are history, not what the next cycle reads
    loaded = _store(store.path, key).load()
    assert loaded.latest.cycle == RECENT + 10 and loaded.decided("s4-0", "aa") is not None  # the last screened cycle's


def test_history_replays_every_cycle_with_its_decisions(tmp_path: Path, key: SigningKey) -> None:
    store = _store(tmp_path / "state.json", key)
    state = _cycles(store, 3, decisions=2)
    store.update(state.begin("other").fail("stopped"))
    records = _store(store.path, key).history()
    assert [(r.cycle, r.status, len(r.shards)) for r in records] == [
        (1, "accepted", 2),
        (2, "accepted", 2),
        (3, "accepted", 2),
        (4, "failed", 0),
    ]


def test_rollback_records_in_the_state_refuse_an_older_manifest_version() -> None:
    key = "ab" * 32 + "/digits-trusted"
    state = CycleState().accept_manifest(key, 3, "11" * 32)
    assert state.rollback_records.accepted[key].version == 3
    with pytest.raises(RollbackError, match="older than accepted version 3"):
        state.accept_manifest(key, 2, "22" * 32)
    with pytest.raises(RollbackError, match="different content"):
        state.rollback_records.check(key, 3, "33" * 32)
    other_key_set = "cd" * 32 + "/digits-trusted"
    state.rollback_records.check(other_key_set, 1, "44" * 32)


def test_rollback_records_survive_a_signed_reload(tmp_path: Path, key: SigningKey) -> None:
    store = _store(tmp_path / "state.json", key)
    state = _cycles(store, 1)
    namespace = "ab" * 32 + "/digits"
    store.update(state.begin("c").accept_manifest(namespace, 7, "11" * 32).fail("stop"))
    with pytest.raises(RollbackError, match="older than accepted version 7"):
        _store(store.path, key).load().accept_manifest(namespace, 6, "22" * 32)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=80) | st.text(max_size=80).map(str.encode))
def test_random_bytes_as_the_state_only_ever_raise_state_error(data: bytes) -> None:
    signing = generate_signing_key("ed25519")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "state.json"
        for payload in (data, sign_envelope(STATE_PAYLOAD_TYPE, data, signing).to_json()):
            path.write_bytes(payload)
            try:
                _store(path, signing).load()
            except StateError as error:
                assert "\n" not in str(error)


_decisions = st.builds(
    ShardDecision,
    shard=st.text(min_size=1, max_size=5),
    sha256=st.sampled_from(["a", "b"]),
    source=st.just("s"),
    accepted=st.booleans(),
    check=st.just("roni"),
    reason=st.text(max_size=5),
)


@settings(max_examples=25, deadline=None)
@given(batches=st.lists(st.lists(_decisions, max_size=3), max_size=4), accept=st.booleans())
def test_any_history_survives_a_signed_round_trip(batches: list[list[ShardDecision]], accept: bool) -> None:
    signing = generate_signing_key("ed25519")
    with tempfile.TemporaryDirectory() as folder:
        store = _store(Path(folder) / "state.json", signing)
        state = store.load().begin("c")
        for batch in batches:
            state = state.decide(batch)
        state = store.update(state)
        state = store.update(state.accept(MODEL_1, HELDOUT_1) if accept else state.reject("no"))
        again = _store(store.path, signing).load()
        assert again == state


def test_source_evidence_accumulates_across_cycles_and_drops_withdrawn_shards(tmp_path: Path, key: SigningKey) -> None:
    store = _store(tmp_path / "state.json", key)
    offered = ["d1", "d2", "d3"]
    state = store.load().begin("c1").record_evidence([("mallory", "d1", 0.04), ("alice", "d2", 0.6)], offered)
    state = store.update(store.update(state).step_done("screening").accept(MODEL_1, HELDOUT_1))
    state = store.update(state.begin("c2").record_evidence([("mallory", "d3", 0.03), ("mallory", "d1", 0.05)], offered))

    loaded = _store(store.path, key).load()
    assert loaded.evidence["mallory"].p_values == {"d1": 0.05, "d3": 0.03}  # the same content keeps one p-value
    assert loaded.earlier_evidence(exclude=["d3"]) == {"mallory": [0.05], "alice": [0.6]}

    later = loaded.step_done("screening").accept(MODEL_1, HELDOUT_1).begin("c3")
    withdrawn = later.record_evidence([], offered=["d3"])
    assert withdrawn.evidence["mallory"].p_values == {"d3": 0.03} and "alice" not in withdrawn.evidence


def test_evidence_outside_the_unit_interval_is_malformed() -> None:
    state = CycleState().begin("c")
    with pytest.raises(StateError, match="evidence"):
        apply(state, Event(kind="evidence", cycle=1, body={"evidence": {"mallory": {"d1": 0.0}}}))


def test_a_whole_copied_project_keeps_its_state(tmp_path: Path, key: SigningKey) -> None:
    store = _store(tmp_path / "a" / "state.json", key)
    _cycles(store, 2)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert _store(tmp_path / "b" / "state.json", key).load().latest.cycle == 2


def test_an_operator_cleared_source_is_judged_afresh_and_its_evidence_forgotten(
    tmp_path: Path, key: SigningKey
) -> None:
    store = _store(tmp_path / "state.json", key)
    refused = ShardDecision(shard="d:bob-1", sha256="bb", source="bob", accepted=False, check="roni", reason="p")
    state = store.update(store.load().begin("c").decide([refused, _decision("a-1")]))
    state = store.update(state.record_evidence([("bob", "bb", 0.001), ("alice", "aa", 0.5)], ["aa", "bb"]))
    state = store.update(state.accept(MODEL_1, HELDOUT_1))
    assert state.decided("d:bob-1", "bb") is not None

    cleared = store.update(state.operate_source("bob", "clear", "the label detector misfired on a reshuffle"))
    for view in (cleared, _store(store.path, key).load()):
        assert view.decided("d:bob-1", "bb") is None and view.decided("a-1", "aa") is not None
        assert "bob" not in view.evidence and "alice" in view.evidence
    again = store.update(cleared.begin("c").decide([refused.model_copy(update={"accepted": True})]))
    later = store.update(again.accept(MODEL_1, HELDOUT_1))
    assert later.cleared == () and later.decided("d:bob-1", "bb").accepted


def test_an_operator_quarantine_holds_until_released_and_is_refused_mid_cycle(tmp_path: Path, key: SigningKey) -> None:
    store = _store(tmp_path / "state.json", key)
    state = _cycles(store, 1)
    state = store.update(state.operate_source("mallory", "quarantine", "key reported stolen"))
    assert _store(store.path, key).load().quarantined == {"mallory": "key reported stolen"}
    with pytest.raises(StateError, match="not quarantined"):
        state.operate_source("alice", "release", "x")
    with pytest.raises(StateError, match="between cycles"):
        state.begin("c").operate_source("mallory", "release", "x")
    released = store.update(state.operate_source("mallory", "release", "key rotated"))
    assert _store(store.path, key).load().quarantined == {} and released.cleared == ("mallory",)
