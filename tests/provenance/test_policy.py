"""Trust flows from keys: a key set vouches only for the datasets, sources and roles its policy grants it."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from trainguard.provenance import verify_dataset
from trainguard.provenance.errors import PolicyError, UnauthorizedRoleError
from trainguard.provenance.policy import load_trust
from trainguard.provenance.verify import open_manifest

if TYPE_CHECKING:
    from conftest import Keys

ALL_ROLES = ["train", "trusted", "holdout"]


def _policy(path: Path, *signers: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"signers": list(signers)}))
    return path


@pytest.fixture
def project_policy(key_pairs: Keys) -> Path:
    """Alice is the curator (trusted base and held-out set of `digits`); Bob contributes `contrib` for two sources."""
    return _policy(
        key_pairs.folder / "project-policy.json",
        {"name": "curator", "keys": ["alice.pub"], "datasets": ["digits"], "sources": ["curator"], "roles": ALL_ROLES},
        {"name": "owner", "keys": ["bob.pub"], "datasets": ["contrib"], "sources": ["alice", "bob"]},
    )


def _contribution(signer: Any, data_dir: Path, key_pairs: Keys, tmp_path: Path, **options: Any) -> Path:
    """Bob's contribution: the fixture's shards, by default attributed to alice and bob, role train."""
    settings = {"dataset": "contrib", "sources": {"*": "alice"}, "roles": {}} | options
    return signer(data_dir, key_pairs.bob, tmp_path / "contrib.json", **settings)


def _reasons(manifest: Path, policy: Path, data_dir: Path, tmp_path: Path) -> dict[str | None, str]:
    report = verify_dataset(manifest, policy, data_dir=data_dir, state=tmp_path / "state.json")
    return {f.shard: f.reason for f in report.failures}


def test_a_contribution_key_may_offer_screened_training_data(
    signer: Any, data_dir: Path, key_pairs: Keys, project_policy: Path, tmp_path: Path
) -> None:
    manifest = _contribution(signer, data_dir, key_pairs, tmp_path)
    verified = open_manifest(manifest, project_policy, dataset="contrib", data_dir=data_dir, state=tmp_path / "s")
    assert verified.key_set.name == "owner"
    assert {s.role for s in verified.manifest.shards} == {"train"}


def test_contribution_key_cannot_grant_trusted_role(
    signer: Any, data_dir: Path, key_pairs: Keys, project_policy: Path, tmp_path: Path
) -> None:
    manifest = _contribution(signer, data_dir, key_pairs, tmp_path, roles={"alice/*": "trusted"})
    assert _reasons(manifest, project_policy, data_dir, tmp_path) == {None: "unauthorized-role"}
    with pytest.raises(UnauthorizedRoleError, match=r"claims role 'trusted', which key set owner may not grant") as e:
        open_manifest(manifest, project_policy, data_dir=data_dir, state=tmp_path / "s")
    assert e.value.shard == "alice/shard-00.parquet"


def test_contribution_key_cannot_add_to_the_holdout_set(
    signer: Any, data_dir: Path, key_pairs: Keys, project_policy: Path, tmp_path: Path
) -> None:
    manifest = _contribution(signer, data_dir, key_pairs, tmp_path, roles={"holdout.parquet": "holdout"})
    assert _reasons(manifest, project_policy, data_dir, tmp_path) == {None: "unauthorized-role"}


def test_contribution_key_cannot_grant_trusted_source(
    signer: Any, data_dir: Path, key_pairs: Keys, project_policy: Path, tmp_path: Path
) -> None:
    manifest = _contribution(signer, data_dir, key_pairs, tmp_path, sources={"*": "curator"})
    assert _reasons(manifest, project_policy, data_dir, tmp_path) == {None: "unauthorized-source"}


def test_contribution_key_cannot_sign_the_curators_dataset(
    signer: Any, data_dir: Path, key_pairs: Keys, project_policy: Path, tmp_path: Path
) -> None:
    manifest = _contribution(signer, data_dir, key_pairs, tmp_path, dataset="digits")
    assert _reasons(manifest, project_policy, data_dir, tmp_path) == {None: "unauthorized-dataset"}


def test_the_curator_may_grant_trusted_and_holdout(
    signer: Any, data_dir: Path, key_pairs: Keys, project_policy: Path, tmp_path: Path
) -> None:
    roles = {"holdout.parquet": "holdout", "alice/*": "trusted"}
    manifest = signer(data_dir, key_pairs.alice, tmp_path / "m.json", dataset="digits", sources={}, roles=roles)
    assert _reasons(manifest, project_policy, data_dir, tmp_path) == {}


def test_a_bare_public_key_grants_the_train_role_only(
    signer: Any, data_dir: Path, key_pairs: Keys, tmp_path: Path
) -> None:
    train_only = signer(data_dir, key_pairs.alice, tmp_path / "train.json", roles={})
    assert _reasons(train_only, key_pairs.pub("alice"), data_dir, tmp_path) == {}
    with_holdout = signer(data_dir, key_pairs.alice, tmp_path / "holdout.json", version=2)
    assert _reasons(with_holdout, key_pairs.pub("alice"), data_dir, tmp_path) == {None: "unauthorized-role"}


def test_the_first_key_set_granted_the_claims_is_chosen(
    signer: Any, data_dir: Path, key_pairs: Keys, tmp_path: Path
) -> None:
    policy = _policy(
        tmp_path / "policy.json",
        {"name": "narrow", "keys": [str(key_pairs.pub("alice"))], "datasets": ["other"]},
        {"name": "wide", "keys": [str(key_pairs.pub("alice")), str(key_pairs.pub("carol"))], "roles": ALL_ROLES},
    )
    manifest = signer(data_dir, key_pairs.alice, tmp_path / "m.json")
    assert open_manifest(manifest, policy, data_dir=data_dir, state=tmp_path / "s").key_set.name == "wide"


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"keys": ["alice.pub"], "role": ["holdout"]}, "unknown field 'role'"),
        ({"keys": ["alice.pub"], "roles": ["admin"]}, "unknown role 'admin'"),
        ({"keys": ["alice.pub"], "sources": []}, "sources must be a non-empty list"),
        ({"keys": ["alice.pub"], "datasets": "digits"}, "datasets must be a list of strings"),
        ({"signers": [{"keys": ["alice.pub"]}], "threshold": 1}, "holds only a list of key sets"),
        ({"signers": []}, "lists no key sets"),
        ({"name": "../curator", "keys": ["alice.pub"]}, "not a safe name"),
        ({"name": "cur/ator", "keys": ["alice.pub"]}, "not a safe name"),
        ({"name": "key:" + "ab" * 32, "keys": ["alice.pub"]}, "not a safe name"),
        ({"name": "a" * 65, "keys": ["alice.pub"]}, "not a safe name"),
        ({"signers": [{"name": "x", "keys": ["alice.pub"]}, {"name": "x", "keys": ["bob.pub"]}]}, "named 'x'"),
        ({"signers": [{"keys": ["alice.pub"]}, {"keys": ["alice.pub", "bob.pub"]}]}, "first key .*; name them"),
    ],
)
def test_a_policy_that_does_not_say_one_thing_is_bad_input(
    document: object, problem: str, key_pairs: Keys, tmp_path: Path
) -> None:
    path = key_pairs.folder / f"bad-{abs(hash(problem))}.json"
    path.write_text(json.dumps(document))
    with pytest.raises(PolicyError, match=problem) as refused:
        load_trust(path)
    assert refused.value.exit_code == 2


def test_duplicate_keys_in_a_policy_are_refused(key_pairs: Keys) -> None:
    yaml_policy = key_pairs.folder / "dup.yaml"
    yaml_policy.write_text("keys: [alice.pub]\nroles: [train]\nroles: [train, trusted, holdout]\n")
    json_policy = key_pairs.folder / "dup.json"
    json_policy.write_text('{"keys": ["alice.pub"], "roles": ["train"], "roles": ["holdout"]}')
    for path in (yaml_policy, json_policy):
        with pytest.raises(PolicyError, match="duplicate key 'roles'"):
            load_trust(path)


def test_a_fifo_as_trust_policy_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "trust.json"
    os.mkfifo(fifo)
    errors: list[Exception] = []

    def load() -> None:
        try:
            load_trust(fifo)
        except PolicyError as error:
            errors.append(error)

    worker = threading.Thread(target=load)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive() and "not a regular file" in str(errors[0])


def test_the_rollback_namespace_is_the_key_set_name_and_an_unnamed_set_is_named_after_its_key(
    key_pairs: Keys, tmp_path: Path
) -> None:
    alice, bob = str(key_pairs.pub("alice")), str(key_pairs.pub("bob"))
    named = _policy(tmp_path / "a.json", {"name": "x", "keys": [alice]})
    grown = _policy(tmp_path / "b.json", {"name": "x", "keys": [alice, bob], "threshold": 2, "roles": ALL_ROLES})
    unnamed = _policy(tmp_path / "c.json", {"keys": [alice, bob]})
    assert load_trust(named).key_sets[0].namespace == load_trust(grown).key_sets[0].namespace == "x"
    key_name = f"key:{key_pairs.alice.keyid}"
    assert load_trust(key_pairs.pub("alice")).key_sets[0].namespace == key_name
    assert load_trust(unnamed).key_sets[0].namespace == key_name
