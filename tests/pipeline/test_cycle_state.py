"""Cross-cycle state: decisions persist, a killed cycle resumes, a rejected cycle keeps the last accepted model;
the state is signed with the cycle's key and refused when edited, forged or rolled back."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainguard.pipeline.cycle_state import (
    STATE_PAYLOAD_TYPE,
    CycleState,
    HeldoutRecord,
    ModelRecord,
    ShardDecision,
    StateStore,
    state_from_json,
    state_to_json,
)
from trainguard.pipeline.errors import StateError, TamperedStateError
from trainguard.provenance.dsse import Envelope, sign_envelope
from trainguard.provenance.errors import RollbackError
from trainguard.provenance.keys import SigningKey, generate_signing_key, write_keypair


@pytest.fixture(scope="module")
def key() -> SigningKey:
    """The cycle's key, which signs the state."""
    return generate_signing_key("ecdsa-p256")


def _decision(name: str, accepted: bool = True, digest: str = "aa") -> ShardDecision:
    reason = "" if accepted else "RONI: held-out accuracy drops 0.120 > 0.030"
    return ShardDecision(shard=name, sha256=digest, source="alice", accepted=accepted, check="roni", reason=reason)


MODEL_1 = ModelRecord(path="cycle-1/model", sha256="11" * 32)
HELDOUT_1 = HeldoutRecord(manifest_sha256="cc" * 32, clean_accuracy=0.93, robust_accuracy={"0.1": 0.61})


def test_an_accepted_cycle_becomes_the_starting_point_and_a_rejected_one_changes_nothing(
    tmp_path: Path, key: SigningKey
) -> None:
    store = StateStore(tmp_path / "state.json", key)
    state = store.update(store.load().begin("c1").decide([_decision("a.parquet")]))
    state = store.update(state.step_done("trained", {"val/acc": 0.93}).accept(MODEL_1, HELDOUT_1))
    state = store.update(state.begin("c1").decide([_decision("b.parquet", accepted=False)]))
    store.save(state.reject("gate: clean accuracy 0.71 < 0.85", candidate=ModelRecord(path="x", sha256="22" * 32)))

    loaded = store.load()
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
        from trainguard.pipeline.cycle_state import StateStore, ShardDecision
        from trainguard.provenance.keys import load_signing_key
        store = StateStore({str(path)!r}, load_signing_key({str(private)!r}))
        state = store.update(store.load().begin("cfg"))
        for i in range(3):
            state = store.update(state.decide([ShardDecision(shard=f"s{{i}}", sha256="d", source="bob",
                                                             accepted=i != 1, check="roni", reason="r")]))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr

    store = StateStore(path, key)
    resumed = store.load().begin("cfg")
    assert resumed.current is not None and resumed.current.cycle == 1
    assert [d.shard for d in resumed.current.shards] == ["s0", "s1", "s2"]
    assert resumed.decided("s1", "d").accepted is False
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]

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
    store = StateStore(tmp_path / "state.json", key)
    with store.locked(), pytest.raises(StateError, match="another cycle holds the lock"), store.locked():
        pass
    with store.locked():
        pass


def test_a_corrupt_state_file_is_an_error_not_a_reset(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(sign_envelope(STATE_PAYLOAD_TYPE, b'{"cycles": [{"cycle": "one"}]}', key).to_json())
    with pytest.raises(StateError, match=rf"{path}: malformed cycle state at cycles.0"):
        StateStore(path, key).load()


def test_an_edited_verdict_in_the_state_is_refused(tmp_path: Path, key: SigningKey) -> None:
    store = StateStore(tmp_path / "state.json", key)
    store.save(CycleState().begin("c").decide([_decision("poison.parquet", accepted=False)]).fail("stop"))
    envelope = Envelope.from_json(store.path.read_bytes())
    edited = envelope.payload.replace(b'"accepted": false', b'"accepted": true')
    assert edited != envelope.payload
    store.path.write_bytes(Envelope(envelope.payload_type, edited, envelope.signatures).to_json())
    with pytest.raises(TamperedStateError, match="edited outside trainguard") as refused:
        store.load()
    assert refused.value.exit_code == 1


def test_a_plain_json_state_is_refused_not_believed(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "state.json"
    path.write_text(state_to_json(CycleState()))
    with pytest.raises(TamperedStateError):
        StateStore(path, key).load()


def test_a_state_signed_by_another_key_is_refused(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "state.json"
    StateStore(path, generate_signing_key("ecdsa-p256")).save(CycleState().begin("c"))
    with pytest.raises(TamperedStateError, match="valid signature of the cycle key"):
        StateStore(path, key).load()


def test_a_symlinked_state_file_is_refused(tmp_path: Path, key: SigningKey) -> None:
    real = tmp_path / "elsewhere.json"
    StateStore(real, key).save(CycleState())
    (tmp_path / "state.json").symlink_to(real)
    with pytest.raises(StateError, match="symbolic link"):
        StateStore(tmp_path / "state.json", key).load()


def test_rollback_records_in_the_state_refuse_an_older_manifest_version() -> None:
    key = "ab" * 32 + "/digits-trusted"
    state = CycleState().accept_manifest(key, 3, "11" * 32)
    assert state_from_json(state_to_json(state)).rollback_records.accepted[key].version == 3
    with pytest.raises(RollbackError, match="older than accepted version 3"):
        state.accept_manifest(key, 2, "22" * 32)
    with pytest.raises(RollbackError, match="different content"):
        state.rollback_records.check(key, 3, "33" * 32)
    other_key_set = "cd" * 32 + "/digits-trusted"
    state.rollback_records.check(other_key_set, 1, "44" * 32)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=80) | st.text(max_size=80).map(str.encode))
def test_random_bytes_only_ever_raise_state_error(data: bytes) -> None:
    try:
        state_from_json(data)
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


@settings(max_examples=50, deadline=None)
@given(batches=st.lists(st.lists(_decisions, max_size=3), max_size=4), accept=st.booleans())
def test_any_history_survives_a_round_trip(batches: list[list[ShardDecision]], accept: bool) -> None:
    state = CycleState().begin("c")
    for batch in batches:
        state = state.decide(batch)
    state = state.accept(MODEL_1, HELDOUT_1) if accept else state.reject("no")
    again = state_from_json(state_to_json(state))
    assert again == state
    assert json.loads(state_to_json(again)) == json.loads(state_to_json(state))


def test_source_evidence_accumulates_across_cycles_and_survives_a_signed_reload(
    tmp_path: Path, key: SigningKey
) -> None:
    store = StateStore(tmp_path / "state.json", key)
    state = store.update(store.load().begin("c1").record_evidence([("mallory", "d1", 0.04), ("alice", "d2", 0.6)]))
    state = store.update(state.step_done("screening").accept(MODEL_1, HELDOUT_1))
    state = store.update(state.begin("c2").record_evidence([("mallory", "d3", 0.03), ("mallory", "d1", 0.05)]))

    loaded = store.load()
    assert loaded.evidence["mallory"].p_values == {"d1": 0.05, "d3": 0.03}  # the same content keeps one p-value
    assert loaded.earlier_evidence(exclude=["d3"]) == {"mallory": [0.05], "alice": [0.6]}

    envelope = Envelope.from_json((tmp_path / "state.json").read_bytes())
    edited = envelope.payload.replace(b'"d3": 0.03', b'"d3": 0.9', 1)
    assert edited != envelope.payload
    (tmp_path / "state.json").write_bytes(Envelope(envelope.payload_type, edited, envelope.signatures).to_json())
    with pytest.raises(TamperedStateError):
        store.load()


def test_evidence_outside_the_unit_interval_is_malformed() -> None:
    document = json.loads(state_to_json(CycleState()))
    document["evidence"] = {"mallory": {"p_values": {"d1": 0.0}}}
    with pytest.raises(StateError, match="evidence"):
        state_from_json(json.dumps(document))
