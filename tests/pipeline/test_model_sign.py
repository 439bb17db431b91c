"""Signed model directories: the standard `model_signing verify key` accepts them and refuses any change."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from digits_demo.models import DigitsCNN

from trainguard.pipeline.errors import ModelIdentityError, ModelNotFoundError, ModelSignatureError
from trainguard.pipeline.model_sign import (
    ATTESTATION_BUNDLE_FILE,
    ATTESTATION_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    SIGNATURE_FILE,
    Attestation,
    file_sha256,
    load_verified_state_dict,
    read_model_description,
    verify_model_signature,
    write_signed_model,
)

MODEL_SIGNING = str(Path(sys.executable).parent / "model_signing")


def _keypair(directory: Path, name: str, passphrase: bytes | None = None) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    encryption = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    private = directory / f"{name}.key"
    public = directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def _cli_verify(model_dir: Path, public: Path) -> subprocess.CompletedProcess[str]:
    command = [MODEL_SIGNING, "verify", "key", str(model_dir)]
    command += ["--signature", str(model_dir / SIGNATURE_FILE), "--public_key", str(public)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _keypair(tmp_path_factory.mktemp("keys"), "model")


def _signed(tmp_path: Path, keys: tuple[Path, Path], name: str = "model", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    directory = tmp_path / name
    write_signed_model(
        DigitsCNN(channels=2),
        directory,
        keys[0],
        class_path="digits_demo.models.DigitsCNN",
        init_args={"channels": 2},
        attest=lambda files: Attestation(f'{{"model": "{files.digests[MODEL_FILE]}"}}'.encode(), b'{"bundle": 1}'),
    )
    return directory


def test_a_signed_model_verifies_with_the_standard_cli_and_the_api(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    directory = _signed(tmp_path, keys)
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [MODEL_FILE, CONFIG_FILE, SIGNATURE_FILE, ATTESTATION_FILE, ATTESTATION_BUNDLE_FILE]
    )
    signed = json.loads(
        base64.b64decode(json.loads((directory / SIGNATURE_FILE).read_text())["dsseEnvelope"]["payload"])
    )
    assert [subject["name"] for subject in signed["subject"]] == [directory.name]  # the released name, not staging
    done = _cli_verify(directory, keys[1])
    assert done.returncode == 0, done.stderr
    files = verify_model_signature(directory, keys[1])
    assert files.digests == {name: file_sha256(directory / name) for name in (MODEL_FILE, CONFIG_FILE)}
    assert files.digests[MODEL_FILE] in (directory / ATTESTATION_FILE).read_text()
    net = DigitsCNN(channels=2)
    net.load_state_dict(load_verified_state_dict(directory, keys[1], files.digests[MODEL_FILE]))
    assert read_model_description(directory)["init_args"] == {"channels": 2}


def test_an_edited_weights_file_is_refused_by_both(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    directory = _signed(tmp_path, keys)
    data = bytearray((directory / MODEL_FILE).read_bytes())
    data[-5] ^= 0x01
    (directory / MODEL_FILE).write_bytes(bytes(data))
    assert _cli_verify(directory, keys[1]).returncode != 0
    with pytest.raises(ModelSignatureError, match=rf"{directory}: model signature check failed.*{MODEL_FILE}"):
        verify_model_signature(directory, keys[1])
    with pytest.raises(ModelSignatureError):
        load_verified_state_dict(directory, keys[1], file_sha256(directory / MODEL_FILE))


def test_a_weights_file_swapped_from_another_signed_model_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    first, second = _signed(tmp_path, keys, "first", seed=1), _signed(tmp_path, keys, "second", seed=2)
    shutil.copyfile(second / MODEL_FILE, first / MODEL_FILE)
    assert _cli_verify(first, keys[1]).returncode != 0
    with pytest.raises(ModelSignatureError, match="Hash mismatch"):
        verify_model_signature(first, keys[1])


def test_an_added_file_or_an_edited_description_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    directory = _signed(tmp_path, keys)
    (directory / "extra.bin").write_bytes(b"payload")
    assert _cli_verify(directory, keys[1]).returncode != 0
    with pytest.raises(ModelSignatureError, match=r"extra\.bin"):
        verify_model_signature(directory, keys[1])
    (directory / "extra.bin").unlink()
    (directory / CONFIG_FILE).write_text('{"class_path": "os.system"}')
    with pytest.raises(ModelSignatureError, match=CONFIG_FILE):
        verify_model_signature(directory, keys[1])


def test_a_signature_by_another_key_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    directory = _signed(tmp_path, keys)
    _, stranger = _keypair(tmp_path, "stranger")
    assert _cli_verify(directory, stranger).returncode != 0
    with pytest.raises(ModelSignatureError, match=r"stranger\.pub"):
        verify_model_signature(directory, stranger)


def test_a_missing_signature_and_a_missing_directory_are_told_apart(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    directory = _signed(tmp_path, keys)
    (directory / SIGNATURE_FILE).unlink()
    with pytest.raises(ModelSignatureError, match="not signed") as unsigned:
        verify_model_signature(directory, keys[1])
    assert unsigned.value.exit_code == 1
    with pytest.raises(ModelNotFoundError) as missing:
        verify_model_signature(tmp_path / "nowhere", keys[1])
    assert missing.value.exit_code == 2


def test_rewriting_a_model_directory_replaces_it_whole(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    directory = _signed(tmp_path, keys, seed=1)
    before = file_sha256(directory / MODEL_FILE)
    _signed(tmp_path, keys, seed=2)
    assert file_sha256(directory / MODEL_FILE) != before
    verify_model_signature(directory, keys[1])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_encrypted_key_needs_the_passphrase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    private, public = _keypair(tmp_path, "locked", passphrase=b"correct horse")
    monkeypatch.delenv("TRAINGUARD_KEY_PASSPHRASE", raising=False)
    with pytest.raises(ModelSignatureError, match="TRAINGUARD_KEY_PASSPHRASE"):
        write_signed_model({"w": torch.zeros(2)}, tmp_path / "m", private)
    assert not (tmp_path / "m").exists()
    monkeypatch.setenv("TRAINGUARD_KEY_PASSPHRASE", "correct horse")
    files = write_signed_model({"w": torch.zeros(2)}, tmp_path / "m", private)
    assert verify_model_signature(files.directory, public).digests == files.digests


def test_a_key_model_signing_cannot_use_is_refused_by_name(tmp_path: Path) -> None:
    from trainguard.provenance.keys import generate_signing_key, write_keypair

    ed25519, _ = write_keypair(generate_signing_key("ed25519"), tmp_path / "ed")
    with pytest.raises(ModelSignatureError, match=r"ed\.key: model signing needs an ECDSA"):
        write_signed_model({"w": torch.zeros(2)}, tmp_path / "m", ed25519)
    with pytest.raises(ModelNotFoundError, match=r"absent\.key"):
        write_signed_model({"w": torch.zeros(2)}, tmp_path / "m", tmp_path / "absent.key")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ed.key", "ed.pub"]


@pytest.mark.parametrize("name", [".gitattributes", ".git/config", ".hidden", "sub/.env", "notes.txt"])
def test_any_file_the_signature_does_not_cover_is_refused(tmp_path: Path, keys: tuple[Path, Path], name: str) -> None:
    directory = _signed(tmp_path, keys)
    (directory / name).parent.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(b"*.safetensors filter=evil\n")
    with pytest.raises(ModelSignatureError, match=name.replace(".", r"\.")) as caught:
        verify_model_signature(directory, keys[1])
    assert caught.value.exit_code == 1
    with pytest.raises(ModelSignatureError):
        load_verified_state_dict(directory, keys[1], file_sha256(directory / MODEL_FILE))


def test_git_files_present_at_signing_are_covered_by_the_signature(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    from trainguard.pipeline.model_sign import sign_model

    directory = _signed(tmp_path, keys)
    (directory / ".gitattributes").write_text("* -text\n")
    sign_model(directory, keys[0])
    assert ".gitattributes" in verify_model_signature(directory, keys[1]).digests
    (directory / ".gitattributes").write_text("* filter=evil\n")
    with pytest.raises(ModelSignatureError, match=r"\.gitattributes"):
        verify_model_signature(directory, keys[1])


def test_a_symlink_in_a_signed_model_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    directory = _signed(tmp_path, keys)
    (directory / "link").symlink_to(directory / MODEL_FILE)
    with pytest.raises(ModelSignatureError, match="link is a symbolic link"):
        verify_model_signature(directory, keys[1])


def test_a_fifo_signature_bundle_or_key_is_refused_without_hanging(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    import os

    directory = _signed(tmp_path, keys)
    (directory / SIGNATURE_FILE).unlink()
    os.mkfifo(directory / SIGNATURE_FILE)
    with pytest.raises(ModelSignatureError, match="not a regular file") as caught:
        verify_model_signature(directory, keys[1])
    assert caught.value.exit_code == 2
    os.mkfifo(tmp_path / "fifo.pub")
    with pytest.raises(ModelSignatureError, match="not a regular file"):
        verify_model_signature(_signed(tmp_path, keys, "other"), tmp_path / "fifo.pub")


def test_a_validly_signed_model_other_than_the_recorded_one_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    older = _signed(tmp_path / "older", keys)
    newer = write_signed_model({"w": torch.ones(2)}, tmp_path / "newer", keys[0])
    for file in older.iterdir():
        shutil.copy(file, newer.directory / file.name)
    with pytest.raises(ModelIdentityError, match="not the recorded") as refused:
        load_verified_state_dict(newer.directory, keys[1], newer.digests[MODEL_FILE])
    assert refused.value.reason == "model-mismatch"
