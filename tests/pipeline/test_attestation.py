"""The SLSA v1 provenance statement of a cycle: subject, dependencies, parameters and the shard record (the data by
manifest digests and Merkle roots, the refusals listed up to a bound)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from trainguard.pipeline.attestation import (
    LISTED_REFUSALS,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    CycleFacts,
    Resource,
    build_statement,
    cycle_record,
    file_resource,
    git_resource,
    read_log_resource,
    sign_statement,
    statement_bytes,
    verify_attestation,
)
from trainguard.pipeline.cycle_report import accepted_tree, merkle_tree
from trainguard.pipeline.cycle_state import ShardDecision
from trainguard.pipeline.errors import AttestationError, AttestationInputError
from trainguard.provenance.merkle import inclusion_proof, shard_leaf, shard_leaves, verify_inclusion
from trainguard.provenance.reader import ReadLog, ReadRecord

MODEL = {"model.safetensors": "aa" * 32, "model.json": "bb" * 32}
ALLOWED = [("digits:alice/s0.parquet", "01"), ("digits:trusted/t0.parquet", "0a")]


def _log_digest(entries: list[tuple[str, str]]) -> str:
    """The digest of a read log, as `trainguard.provenance.reader.ReadLog.digest` makes it."""
    log = ReadLog()
    for name, digest in entries:
        log.append(ReadRecord("ab" * 32, "digits", name, digest, 1))
    return log.digest()


def _facts(tmp_path: Path, **changes: object) -> CycleFacts:
    config = tmp_path / "cycle.yaml"
    config.write_text("name: digits\n")
    manifest = tmp_path / "train.manifest.json"
    manifest.write_text("{}")
    shards = [
        ShardDecision(shard="alice/s0.parquet", sha256="01", source="alice", accepted=True, check="roni"),
        ShardDecision(
            shard="bob/s0.parquet",
            sha256="02",
            source="bob",
            accepted=False,
            check="roni",
            reason="held-out loss impact 0.41 > threshold 0.12",
        ),
        ShardDecision(
            shard="carol/s1.parquet",
            sha256="03",
            source="carol",
            accepted=False,
            check="verify",
            reason="sha256 mismatch",
        ),
    ]
    values = {
        "model_digests": MODEL,
        "manifests": [file_resource(manifest, "train", {"signerKeyids": ["k1"]})],
        "config": file_resource(config, "config"),
        "resolved_config": {"name": "digits", "training": {"max_epochs": 3}},
        "shards": shards,
        "read_log": read_log_resource(tmp_path / "reads.jsonl", _log_digest([("alice/s0.parquet", "01")]), 1),
        "allowed": merkle_tree(ALLOWED),
        "invocation_id": "cycle-1",
        "started": "2026-01-01T00:00:00Z",
        "finished": "2026-01-01T00:01:00Z",
        "code": Resource("git+https://example.invalid/repo@abc", {"gitCommit": "abc"}, "code"),
        "roni": {"threshold": 0.12, "rejected": 1},
        "gate": {"accepted": True, "clean_accuracy": 0.93},
    }
    values.update(changes)
    values.setdefault("accepted", accepted_tree(values["shards"]))  # type: ignore[arg-type]
    return CycleFacts(**values)


def test_the_statement_is_slsa_provenance_about_the_model_files(tmp_path: Path) -> None:
    statement = build_statement(_facts(tmp_path))
    assert statement["_type"] == STATEMENT_TYPE and statement["predicateType"] == PREDICATE_TYPE
    assert {s["name"]: s["digest"]["sha256"] for s in statement["subject"]} == MODEL
    build = statement["predicate"]["buildDefinition"]
    assert build["externalParameters"]["config"]["training"] == {"max_epochs": 3}
    deps = {d["name"]: d for d in build["resolvedDependencies"]}
    assert deps["train"]["digest"]["sha256"] == file_resource(tmp_path / "train.manifest.json").digest["sha256"]
    assert deps["train"]["annotations"] == {"signerKeyids": ["k1"]}
    assert deps["config"]["uri"].startswith("file:") and len(deps["config"]["digest"]["sha256"]) == 64
    assert deps["code"]["digest"] == {"gitCommit": "abc"}
    assert statement["predicate"]["runDetails"]["metadata"]["invocationId"] == "cycle-1"


def test_the_record_names_the_data_by_digests_and_roots_and_lists_refusals_with_reasons(tmp_path: Path) -> None:
    facts = _facts(tmp_path)
    record = cycle_record(json.loads(statement_bytes(build_statement(facts))))
    data = record["data"]
    assert data["algorithm"] == "rfc9162-sha256"
    assert data["manifests"] == [{"name": "train", "sha256": facts.manifests[0].digest["sha256"]}]
    assert data["allowed"]["shards"] == 2 and data["accepted"]["shards"] == 1
    leaves = shard_leaves(ALLOWED)
    root = bytes.fromhex(data["allowed"]["merkleRoot"])
    at = leaves.index(shard_leaf("digits:trusted/t0.parquet", "0a"))
    assert verify_inclusion(leaves[at], inclusion_proof(leaves, at), root)
    assert not verify_inclusion(shard_leaf("digits:trusted/t0.parquet", "0b"), inclusion_proof(leaves, at), root)
    assert record["shards"]["acceptedCount"] == 1 and record["shards"]["rejectedCount"] == 2
    rejected = {s["name"]: s for s in record["shards"]["rejected"]}
    assert rejected["bob/s0.parquet"]["reason"].startswith("held-out loss impact")
    assert rejected["carol/s1.parquet"]["check"] == "verify"
    assert record["readLog"] == {"sha256": facts.read_log.digest["sha256"], "entries": 1}
    assert record["roni"]["threshold"] == 0.12 and record["gate"]["accepted"] is True


def test_the_statement_does_not_grow_with_the_accepted_shards_and_bounds_the_refusals(tmp_path: Path) -> None:
    def statement(accepted: int, refused: int) -> bytes:
        decisions = [
            ShardDecision(shard=f"a/{i:06d}", sha256=f"{i:064x}", source="a", accepted=True, check="roni")
            for i in range(accepted)
        ]
        decisions += [
            ShardDecision(
                shard=f"r/{i:06d}", sha256=f"{i:064x}", source="r", accepted=False, check="roni", reason="refused"
            )
            for i in range(refused)
        ]
        allowed = [(f"digits:{d.shard}", d.sha256) for d in decisions if d.accepted]
        return statement_bytes(build_statement(_facts(tmp_path, shards=decisions, allowed=merkle_tree(allowed))))

    assert len(statement(1000, 0)) == len(statement(9000, 0))  # counts of as many digits: the same size
    record = cycle_record(json.loads(statement(1, LISTED_REFUSALS + 5)))
    assert record["shards"]["rejectedCount"] == LISTED_REFUSALS + 5
    assert len(record["shards"]["rejected"]) == LISTED_REFUSALS


def test_the_record_lists_ronis_refused_tests_only_and_counts_them_all(tmp_path: Path) -> None:
    tests = [{"name": "a", "accepted": True}, {"name": "b", "accepted": False, "reason": "impact"}]
    roni = cycle_record(build_statement(_facts(tmp_path, roni={"level": 0.05, "decisions": tests})))["roni"]
    assert roni == {"level": 0.05, "tested": 2, "refusedCount": 1, "refused": [tests[1]]}


def test_the_statement_is_deterministic_and_changes_with_any_fact(tmp_path: Path) -> None:
    first = statement_bytes(build_statement(_facts(tmp_path)))
    assert statement_bytes(build_statement(_facts(tmp_path))) == first
    other_log = _log_digest([("alice/s0.parquet", "01"), ("bob/s0.parquet", "02")])
    other = read_log_resource(tmp_path / "reads.jsonl", other_log, 2)
    assert statement_bytes(build_statement(_facts(tmp_path, read_log=other))) != first


def test_a_statement_needs_a_model(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="at least one model file"):
        build_statement(_facts(tmp_path, model_digests={}))


def test_the_code_dependency_is_the_checked_out_commit(dvc_repo: Path, tmp_path: Path) -> None:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=dvc_repo, capture_output=True, text=True).stdout.strip()
    code = git_resource(dvc_repo)
    assert code is not None and code.digest == {"gitCommit": commit}
    assert code.uri == f"git+file://{dvc_repo.resolve().as_posix()}@{commit}" and not code.annotations
    (dvc_repo / ".dvcignore").write_text("# edited\n")
    assert git_resource(dvc_repo).annotations == {"dirty": True}
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    assert git_resource(outside) is None


def test_a_signed_statement_verifies_only_against_its_key(tmp_path: Path) -> None:
    from trainguard.provenance.dsse import Envelope, sign_envelope
    from trainguard.provenance.keys import generate_signing_key, load_signing_key, write_keypair

    private, public = write_keypair(generate_signing_key("ed25519"), tmp_path / "attest")
    _, other = write_keypair(generate_signing_key("ecdsa-p256"), tmp_path / "other")
    statement = build_statement(_facts(tmp_path))
    path = tmp_path / "attestation.json"
    path.write_bytes(sign_statement(statement, private))

    verified = verify_attestation(path, [public])
    assert verified.statement == statement and verified.subjects == MODEL
    assert verified.keyids == (load_signing_key(private).keyid,)
    with pytest.raises(AttestationError, match="no signature from a trusted key"):
        verify_attestation(path, [other])

    envelope = Envelope.from_json(path.read_bytes())
    path.write_bytes(sign_envelope("application/json", envelope.payload, load_signing_key(private)).to_json())
    with pytest.raises(AttestationError, match="payloadType"):
        verify_attestation(path, [public])
    with pytest.raises(AttestationInputError):
        verify_attestation(tmp_path / "absent.json", [public])


def test_a_fifo_or_device_attestation_is_refused_without_hanging(tmp_path: Path) -> None:
    import os

    from trainguard.provenance.keys import generate_signing_key, write_keypair

    _, public = write_keypair(generate_signing_key("ed25519"), tmp_path / "attest")
    os.mkfifo(tmp_path / "fifo.json")
    for path in (tmp_path / "fifo.json", Path("/dev/zero")):
        with pytest.raises(AttestationInputError, match="not a regular file") as caught:
            verify_attestation(path, [public])
        assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    "spoil",
    [
        lambda text: text.replace('{"_type"', '{"_type":"x","_type"', 1),
        lambda text: "\ufeff" + text,
        lambda text: text.replace('"gate":{', '"gate":{"x":NaN,', 1),
        lambda text: text.replace('"gate":{', '"gate":{"x":1e400,', 1),
    ],
    ids=["duplicate-key", "bom", "nan", "overflow"],
)
def test_an_ambiguous_signed_statement_is_malformed(tmp_path: Path, spoil: object) -> None:
    from trainguard.provenance.dsse import sign_envelope
    from trainguard.provenance.keys import generate_signing_key, load_signing_key, write_keypair

    private, public = write_keypair(generate_signing_key("ed25519"), tmp_path / "attest")
    payload = spoil(statement_bytes(build_statement(_facts(tmp_path))).decode()).encode()  # type: ignore[operator]
    path = tmp_path / "attestation.json"
    path.write_bytes(sign_envelope("application/vnd.in-toto+json", payload, load_signing_key(private)).to_json())
    with pytest.raises(AttestationInputError, match="strict JSON") as caught:
        verify_attestation(path, [public])
    assert caught.value.exit_code == 2


def test_an_ambiguous_attestation_envelope_is_malformed(tmp_path: Path) -> None:
    from trainguard.provenance.keys import generate_signing_key, write_keypair

    private, public = write_keypair(generate_signing_key("ed25519"), tmp_path / "attest")
    path = tmp_path / "attestation.json"
    text = sign_statement(build_statement(_facts(tmp_path)), private).decode()
    path.write_text(text.replace('"payloadType"', '"payloadType": "x", "payloadType"', 1))
    with pytest.raises(AttestationInputError, match="duplicate key"):
        verify_attestation(path, [public])
