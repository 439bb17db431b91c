"""`verify_model` / `trainguard verify-model`: a signed model with its attestation passes; any swap is refused."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from trainguard.pipeline.attestation import (
    CycleFacts,
    build_statement,
    file_resource,
    read_log_resource,
    sign_statement,
)
from trainguard.pipeline.cycle_report import accepted_tree, merkle_tree
from trainguard.pipeline.cycle_state import ShardDecision
from trainguard.pipeline.errors import AttestationError, AttestationMismatchError, ModelSignatureError
from trainguard.pipeline.model_sign import ATTESTATION_FILE, MODEL_FILE, ModelFiles, write_signed_model
from trainguard.pipeline.model_verification import verify_model
from trainguard.provenance.keys import generate_signing_key, write_keypair
from trainguard.provenance.reader import ReadLog, ReadRecord

TRAINGUARD = str(Path(sys.executable).parent / "trainguard")
Run = Callable[..., subprocess.CompletedProcess[str]]


def _log_digest(entries: list[tuple[str, str]]) -> str:
    """The digest of a read log, as `trainguard.provenance.reader.ReadLog.digest` makes it."""
    log = ReadLog()
    for name, digest in entries:
        log.append(ReadRecord("ab" * 32, "digits", name, digest, 1))
    return log.digest()


def _keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """A P-256 pair made by trainguard's own key code: one key signs both the model and its attestation."""
    return write_keypair(generate_signing_key("ecdsa-p256"), directory / name)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _keypair(tmp_path_factory.mktemp("keys"), "model")


def _release(
    tmp_path: Path,
    key: Path,
    name: str,
    value: float,
    attestation_key: Path | None = None,
    cycle: object = None,
    shards: dict[str, object] | None = None,
) -> Path:
    """A signed model directory with its signed attestation, as a cycle writes it (recording `cycle` if given, and
    `shards` as the record's shard entry if given)."""
    config = tmp_path / "cycle.yaml"
    config.write_text("name: test\n")

    def attest(files: ModelFiles) -> bytes:
        decisions = [ShardDecision(shard="a", sha256="01", source="s", accepted=True, check="roni")]
        facts = CycleFacts(
            model_digests=files.digests,
            manifests=[],
            config=file_resource(config, "config"),
            resolved_config={"name": "test"},
            shards=decisions,
            read_log=read_log_resource(tmp_path / "reads.jsonl", _log_digest([("a", "01")]), 1),
            allowed=merkle_tree([]),
            accepted=accepted_tree(decisions),
            invocation_id=name,
            started="2026-01-01T00:00:00Z",
            finished="2026-01-01T00:00:01Z",
        )
        statement = build_statement(facts)
        if cycle is not None:
            statement["predicate"]["runDetails"]["byproducts"][0]["annotations"]["cycle"] = cycle
        if shards is not None:
            statement["predicate"]["runDetails"]["byproducts"][0]["annotations"]["shards"] = shards
        return sign_statement(statement, attestation_key or key)

    directory = tmp_path / name
    write_signed_model({"w": torch.full((4,), value)}, directory, key, attest=attest)
    return directory


@pytest.fixture
def verify_cli(cli: Run, tmp_path: Path) -> Run:
    """`verify_cli(*args)`: `trainguard verify-model *args` in this process (`cli`); one test below starts it as its
    own process."""
    return lambda *args: cli(tmp_path, "verify-model", *args)


def test_a_released_model_verifies(tmp_path: Path, keys: tuple[Path, Path], verify_cli: Run) -> None:
    model = _release(tmp_path, keys[0], "cycle-1", 1.0)
    result = verify_model(model, None, keys[1])
    assert result.invocation_id == "cycle-1" and result.accepted_shards == 1
    assert result.model_sha256 == result.files[MODEL_FILE]
    done = verify_cli(str(model), "--key", str(keys[1]), "--attestation", str(model / ATTESTATION_FILE), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model_sha256"] == result.model_sha256


def test_a_model_attested_before_the_shard_counts_counts_its_listed_decisions(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """Attestations made before `acceptedCount`/`rejectedCount` list every decision: their lists are counted."""
    listed = {
        "accepted": [{"name": n, "sha256": "01", "source": "s", "check": "roni"} for n in ("a", "b")],
        "rejected": [{"name": "c", "sha256": "02", "source": "s", "check": "roni", "reason": "impact"}],
    }
    result = verify_model(_release(tmp_path, keys[0], "cycle-1", 1.0, shards=listed), None, keys[1])
    assert (result.accepted_shards, result.rejected_shards) == (2, 1)


def test_an_edited_weights_file_fails_the_model_signature(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """The CLI as its own process: `trainguard verify-model` starts and ends in one line (the other tests run it in
    this process, by `cli`)."""
    model = _release(tmp_path, keys[0], "cycle-1", 1.0)
    data = bytearray((model / MODEL_FILE).read_bytes())
    data[-1] ^= 0x01
    (model / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelSignatureError):
        verify_model(model, None, keys[1])
    command = [TRAINGUARD, "verify-model", str(model), "--key", str(keys[1])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and MODEL_FILE in done.stderr and "Traceback" not in done.stderr


def test_a_whole_other_signed_model_under_this_attestation_is_a_mismatch(
    tmp_path: Path, keys: tuple[Path, Path], verify_cli: Run
) -> None:
    accepted = _release(tmp_path, keys[0], "accepted", 1.0)
    rejected = _release(tmp_path, keys[0], "rejected", 2.0)
    shutil.copy(accepted / ATTESTATION_FILE, rejected / ATTESTATION_FILE)  # validly signed model, wrong record
    with pytest.raises(AttestationMismatchError, match=MODEL_FILE):
        verify_model(rejected, None, keys[1])
    done = verify_cli(str(rejected), "--key", str(keys[1]), "--json")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert json.loads(done.stdout)["error"] == "AttestationMismatchError" and "swapped" in done.stdout


def test_an_edited_or_foreign_attestation_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    model = _release(tmp_path, keys[0], "cycle-1", 1.0)
    envelope = json.loads((model / ATTESTATION_FILE).read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["predicate"]["runDetails"]["metadata"]["invocationId"] = "forged"
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (model / ATTESTATION_FILE).write_text(json.dumps(envelope))
    with pytest.raises(AttestationError, match="signature check failed"):
        verify_model(model, None, keys[1])

    stranger, _ = _keypair(tmp_path, "stranger")
    foreign = _release(tmp_path, keys[0], "foreign", 1.0, attestation_key=stranger)
    with pytest.raises(
        AttestationError, match=rf"{ATTESTATION_FILE}: attestation signature check failed: no signature"
    ):
        verify_model(foreign, None, keys[1])


def test_missing_inputs_exit_2_without_a_traceback(tmp_path: Path, keys: tuple[Path, Path], verify_cli: Run) -> None:
    missing_dir = verify_cli(str(tmp_path / "nowhere"), "--key", str(keys[1]), "--json")
    assert missing_dir.returncode == 2 and "nowhere" in missing_dir.stdout
    model = _release(tmp_path, keys[0], "cycle-1", 1.0)
    missing_key = verify_cli(str(model), "--key", str(tmp_path / "absent.pub"), "--json")
    assert missing_key.returncode == 2 and "absent.pub" in missing_key.stdout
    (model / ATTESTATION_FILE).unlink()
    missing_attestation = verify_cli(str(model), "--key", str(keys[1]), "--json")
    assert missing_attestation.returncode == 2
    assert json.loads(missing_attestation.stdout)["ok"] is False
    for done in (missing_dir, missing_key, missing_attestation):
        assert "Traceback" not in done.stderr


def test_verify_model_refuses_an_unsigned_git_file_in_one_line(
    tmp_path: Path, keys: tuple[Path, Path], verify_cli: Run
) -> None:
    model = _release(tmp_path, keys[0], "cycle-1", 1.0)
    (model / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    with pytest.raises(ModelSignatureError, match=r"\.gitattributes"):
        verify_model(model, None, keys[1])
    done = verify_cli(str(model), "--key", str(keys[1]))
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and ".gitattributes" in done.stderr


def test_the_models_own_attestation_is_checked_even_when_another_is_given(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    model = _release(tmp_path, keys[0], "cycle-1", 1.0)
    external = tmp_path / "external.intoto.json"
    shutil.copy(model / ATTESTATION_FILE, external)
    assert verify_model(model, external, keys[1]).invocation_id == "cycle-1"
    (model / ATTESTATION_FILE).write_text('{"payload": "", "payloadType": "x", "signatures": []}')
    with pytest.raises(AttestationError, match=ATTESTATION_FILE):
        verify_model(model, external, keys[1])


def test_the_attested_cycle_is_reported_and_a_signed_non_number_is_refused(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    assert verify_model(_release(tmp_path, keys[0], "unnumbered", 1.0), None, keys[1]).cycle is None
    assert verify_model(_release(tmp_path, keys[0], "cycle-4", 1.0, cycle=4), None, keys[1]).cycle == 4
    for odd in ("4", True, -1, 4.0):
        model = _release(tmp_path, keys[0], f"odd-{odd}", 1.0, cycle=odd)
        with pytest.raises(AttestationError, match="not a cycle number"):
            verify_model(model, None, keys[1])
