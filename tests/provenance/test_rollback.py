"""Anti-rollback records survive routine policy edits: they are kept under the key set's name, a manifest is checked
against every key set holding a key that signed it, and records from before names still apply."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainguard.provenance import cosign_manifest, verify_dataset
from trainguard.provenance.errors import MalformedError, RollbackError
from trainguard.provenance.rollback import Accepted, RollbackRecords
from trainguard.provenance.verify import open_manifest, read_envelope

if TYPE_CHECKING:
    from conftest import Keys

ALL_ROLES = ["train", "trusted", "holdout"]


def _policy(path: Path, keys: Keys, *signers: dict[str, Any]) -> Path:
    """A policy of `signers`, each naming its keys by holder (alice, bob, carol) and granted every role."""
    entries = [{"roles": ALL_ROLES, **s, "keys": [str(keys.pub(k)) for k in s["keys"]]} for s in signers]
    path.write_text(json.dumps({"signers": entries}))
    return path


def _reasons(manifest: Path, policy: Path, data_dir: Path, state: Path) -> dict[str | None, str]:
    return {f.shard: f.reason for f in verify_dataset(manifest, policy, data_dir=data_dir, state=state).failures}


@pytest.fixture
def signed(signer: Any, data_dir: Path, key_pairs: Keys, tmp_path: Path) -> Any:
    """`signed(holder, version, dataset="digits", **options)`: the data dir signed by alice, bob or carol."""

    def sign(holder: str, version: int, dataset: str = "digits", **options: Any) -> Path:
        out = tmp_path / f"{dataset}-v{version}-{holder}.json"
        key = getattr(key_pairs, holder)
        return signer(data_dir, key, out, dataset=dataset, version=version, exclude=(), **options)

    return sign


def test_adding_a_backup_key_keeps_the_records_so_an_older_version_is_refused(
    signed: Any, data_dir: Path, key_pairs: Keys, tmp_path: Path, cli: Callable[..., Any]
) -> None:
    """The finding: a backup key added to a 1-of-1 key set used to open a fresh namespace; `trainguard verify` (in
    this process, by `cli`)."""
    state = tmp_path / "state.json"
    before = _policy(tmp_path / "before.json", key_pairs, {"name": "curator", "keys": ["alice"]})
    old, new = signed("alice", 1), signed("alice", 2)
    assert _reasons(old, before, data_dir, state) == {} and _reasons(new, before, data_dir, state) == {}
    after = _policy(tmp_path / "after.json", key_pairs, {"name": "curator", "keys": ["alice", "bob"]})
    args = ["--trust", str(after), "--data-dir", str(data_dir), "--state", str(state)]
    replayed = cli(tmp_path, "verify", old, *args)
    assert replayed.returncode == 1 and "Traceback" not in replayed.stderr
    assert "manifest: rollback: dataset 'digits': manifest version 1 is older than accepted version 2" in (
        replayed.stderr
    )
    assert cli(tmp_path, "verify", new, *args).returncode == 0


def test_rotating_a_key_keeps_the_records(signed: Any, data_dir: Path, key_pairs: Keys, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    before = _policy(tmp_path / "before.json", key_pairs, {"name": "curator", "keys": ["alice", "bob"]})
    old = signed("bob", 1)
    assert _reasons(old, before, data_dir, state) == {}
    assert _reasons(signed("alice", 2), before, data_dir, state) == {}
    rotated = _policy(tmp_path / "rotated.json", key_pairs, {"name": "curator", "keys": ["carol", "bob"]})
    assert _reasons(old, rotated, data_dir, state) == {None: "rollback"}
    assert _reasons(signed("carol", 3), rotated, data_dir, state) == {}


def test_changing_the_threshold_keeps_the_records(signed: Any, data_dir: Path, key_pairs: Keys, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    old, new = signed("alice", 1), signed("alice", 2)
    for manifest in (old, new):
        cosign_manifest(manifest, key_pairs.bob)
    one = _policy(tmp_path / "one.json", key_pairs, {"name": "curator", "keys": ["alice", "bob"]})
    assert _reasons(old, one, data_dir, state) == {} and _reasons(new, one, data_dir, state) == {}
    two = _policy(tmp_path / "two.json", key_pairs, {"name": "curator", "keys": ["alice", "bob"], "threshold": 2})
    assert _reasons(old, two, data_dir, state) == {None: "rollback"}


def test_a_key_in_two_key_sets_cannot_reset_either(
    signed: Any, data_dir: Path, key_pairs: Keys, tmp_path: Path
) -> None:
    """Bob's key, added as the curator's backup and as the whole of a second key set listed first, signs an older
    version of the curator's dataset: it is checked against the curator's records, not only the fresh second set's;
    the same holds the other way round."""
    state = tmp_path / "state.json"
    curator_alone = _policy(tmp_path / "curator.json", key_pairs, {"name": "curator", "keys": ["alice"]})
    assert _reasons(signed("alice", 1), curator_alone, data_dir, state) == {}
    assert _reasons(signed("alice", 2), curator_alone, data_dir, state) == {}
    curator, mirror = {"name": "curator", "keys": ["alice", "bob"]}, {"name": "mirror", "keys": ["bob"]}
    mirror_first = _policy(tmp_path / "mirror-first.json", key_pairs, mirror, curator)
    older = signed("bob", 1)
    fresh = open_manifest(older, mirror_first, data_dir=data_dir, state=tmp_path / "empty.json")
    assert fresh.rollback_key == "mirror/digits", "recorded in the second set's namespace, which holds nothing"
    with pytest.raises(RollbackError, match=r"older than accepted version 2 \(key set 'curator'"):
        open_manifest(older, mirror_first, data_dir=data_dir, state=state)

    old_contrib = signed("bob", 1, dataset="contrib")
    assert _reasons(old_contrib, mirror_first, data_dir, state) == {}
    assert _reasons(signed("bob", 2, dataset="contrib"), mirror_first, data_dir, state) == {}
    assert set(json.loads(state.read_text())["accepted"]) == {"curator/digits", "mirror/contrib"}
    curator_first = _policy(tmp_path / "curator-first.json", key_pairs, curator, mirror)
    assert open_manifest(old_contrib, curator_first, data_dir=data_dir).rollback_key == "curator/contrib"
    with pytest.raises(RollbackError, match=r"older than accepted version 2 \(key set 'mirror'"):
        open_manifest(old_contrib, curator_first, data_dir=data_dir, state=state)


def test_another_key_set_with_other_keys_still_cannot_lock_this_one_out(
    signed: Any, data_dir: Path, key_pairs: Keys, tmp_path: Path
) -> None:
    state = tmp_path / "state.json"
    policy = _policy(tmp_path / "p.json", key_pairs, {"name": "a", "keys": ["alice"]}, {"name": "b", "keys": ["bob"]})
    assert _reasons(signed("bob", 99), policy, data_dir, state) == {}
    assert _reasons(signed("alice", 1), policy, data_dir, state) == {}


def _fingerprint(threshold: int, *keyids: str) -> str:
    """The namespace records were kept under before key sets had names (pinned here, not imported)."""
    material = json.dumps([threshold, sorted(keyids)], separators=(",", ":"))
    return hashlib.sha256(b"trainguard-keyset-v1\n" + material.encode()).hexdigest()


def test_old_fingerprint_keyed_records_still_apply(
    signed: Any, data_dir: Path, key_pairs: Keys, tmp_path: Path
) -> None:
    """A schema-2 state from before names: its record bounds the named key set, and carries into its name, so a
    policy edit after the upgrade keeps it."""
    state = tmp_path / "state.json"
    old, new = signed("alice", 1), signed("alice", 2)
    legacy = f"{_fingerprint(1, key_pairs.alice.keyid)}/digits"
    entry = {"version": 2, "statement_sha256": hashlib.sha256(read_envelope(new)[1].payload).hexdigest()}
    state.write_text(json.dumps({"schema": 2, "accepted": {legacy: entry}}))
    policy = _policy(tmp_path / "p.json", key_pairs, {"name": "curator", "keys": ["alice"]})
    report = verify_dataset(old, policy, data_dir=data_dir, state=state)
    assert {f.reason for f in report.failures} == {"rollback"}
    assert "recorded before key sets had names" in report.failures[0].detail
    assert _reasons(new, policy, data_dir, state) == {}
    assert json.loads(state.read_text())["schema"] == 3
    grown = _policy(tmp_path / "grown.json", key_pairs, {"name": "curator", "keys": ["alice", "bob"]})
    assert _reasons(old, grown, data_dir, state) == {None: "rollback"}
    with pytest.raises(RollbackError, match="before key sets had names"):
        open_manifest(old, policy, data_dir=data_dir, state=RollbackRecords({legacy: Accepted(2, "ab" * 32)}))


def test_renaming_a_key_set_keeps_its_records(signed: Any, data_dir: Path, key_pairs: Keys, tmp_path: Path) -> None:
    """A rename is a new namespace, but the records of a name the policy no longer has whose key set shared a key
    with this one still apply: an old manifest of a kept key, and a new key's older version, are refused."""
    state = tmp_path / "state.json"
    policy = _policy(tmp_path / "p.json", key_pairs, {"name": "curator", "keys": ["alice"]})
    old = signed("alice", 1)
    assert _reasons(old, policy, data_dir, state) == {}
    assert _reasons(signed("alice", 2), policy, data_dir, state) == {}
    renamed = _policy(tmp_path / "renamed.json", key_pairs, {"name": "curation", "keys": ["alice", "carol"]})
    assert _reasons(old, renamed, data_dir, state) == {None: "rollback"}
    assert _reasons(signed("carol", 1), renamed, data_dir, state) == {None: "rollback"}
    assert _reasons(signed("carol", 3), renamed, data_dir, state) == {}
    recorded = json.loads(state.read_text())["accepted"]
    assert recorded["curation/digits"]["keyids"] == sorted([key_pairs.alice.keyid, key_pairs.carol.keyid])


def test_moving_a_key_to_another_key_set_keeps_its_records(
    signed: Any, data_dir: Path, key_pairs: Keys, tmp_path: Path
) -> None:
    """A record keeps every key its key set ever held when recording: alice's old manifest, once she is moved to
    another key set, is still checked against the records of the set she left, even after it recorded without her."""
    state = tmp_path / "state.json"
    before = _policy(tmp_path / "before.json", key_pairs, {"name": "b", "keys": ["alice"]})
    old = signed("alice", 1)
    assert _reasons(old, before, data_dir, state) == {}
    assert _reasons(signed("alice", 2), before, data_dir, state) == {}
    rotated = _policy(tmp_path / "rotated.json", key_pairs, {"name": "b", "keys": ["bob"]})
    assert _reasons(signed("bob", 3), rotated, data_dir, state) == {}
    moved = _policy(
        tmp_path / "moved.json", key_pairs, {"name": "b", "keys": ["bob"]}, {"name": "a", "keys": ["alice"]}
    )
    assert _reasons(old, moved, data_dir, state) == {None: "rollback"}


def test_a_bare_public_key_keeps_its_records_wherever_the_file_lives(
    signed: Any, data_dir: Path, key_pairs: Keys, tmp_path: Path
) -> None:
    state = tmp_path / "state.json"
    old = signed("alice", 1, roles={})  # a bare .pub grants the role train only
    assert _reasons(old, key_pairs.pub("alice"), data_dir, state) == {}
    report = verify_dataset(signed("alice", 2, roles={}), key_pairs.pub("alice"), data_dir=data_dir, state=state)
    assert report.ok and report.rollback_key == f"key:{key_pairs.alice.keyid}/digits"
    moved = shutil.copy(key_pairs.pub("alice"), tmp_path / "renamed.pub")
    assert _reasons(old, Path(moved), data_dir, state) == {None: "rollback"}


@settings(max_examples=200, deadline=None)
@given(
    document=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=70),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=70), inner, max_size=3),
        max_leaves=8,
    )
)
def test_any_records_document_loads_or_is_malformed(document: object) -> None:
    try:
        records = RollbackRecords.from_json(document, "state.json")
    except MalformedError as error:
        assert "\n" not in str(error)
    else:
        assert RollbackRecords.from_json(records.to_json(), "state.json") == records


@settings(max_examples=100, deadline=None)
@given(
    name=st.from_regex(r"[A-Za-z][A-Za-z0-9._-]{0,63}", fullmatch=True),
    dataset=st.text(min_size=1, max_size=20),
    version=st.integers(min_value=0, max_value=2**40),
    keyids=st.frozensets(st.sampled_from(["ab" * 32, "cd" * 32]), max_size=2),
)
def test_a_recorded_version_survives_its_json_form_and_bounds_older_ones(
    name: str, dataset: str, version: int, keyids: frozenset[str]
) -> None:
    key = f"{name}/{dataset}"
    records = RollbackRecords().recorded(key, version, "11" * 32, keyids)
    again = RollbackRecords.from_json(json.loads(json.dumps(records.to_json())), "state.json")
    assert again.accepted[key] == Accepted(version, "11" * 32, keyids)
    if version:
        with pytest.raises(RollbackError):
            again.check(key, version - 1, "11" * 32)


def test_verify_dataset_checks_in_memory_records_and_writes_no_state_file(
    signed: Any, data_dir: Path, key_pairs: Keys, tmp_path: Path
) -> None:
    """`state=RollbackRecords(...)` (records a caller keeps itself) is checked, not recorded: verification used to
    read the file path that only a RollbackState has and raised AttributeError."""
    policy = _policy(tmp_path / "p.json", key_pairs, {"name": "curator", "keys": ["alice"]})
    old, new = signed("alice", 1), signed("alice", 2)
    files = sorted(tmp_path.rglob("*"))
    assert verify_dataset(new, policy, data_dir=data_dir, state=RollbackRecords()).ok
    verified = open_manifest(new, policy, data_dir=data_dir, state=RollbackRecords())
    records = RollbackRecords({verified.rollback_key: Accepted(2, verified.statement_sha256)})
    report = verify_dataset(old, policy, data_dir=data_dir, state=records)
    assert [f.reason for f in report.failures] == ["rollback"]
    assert sorted(tmp_path.rglob("*")) == files
