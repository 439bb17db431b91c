"""Key generation, PEM files, keyids and signatures for Ed25519 and ECDSA P-256."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trainguard.provenance import (
    KeyFileError,
    generate_signing_key,
    load_signing_key,
    load_verifying_key,
    write_keypair,
)

KEY_TYPES = ["ed25519", "ecdsa-p256"]


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_written_keypair_loads_back_and_signatures_verify(tmp_path: Path, key_type: str) -> None:
    key = generate_signing_key(key_type)
    private, public = write_keypair(key, tmp_path / "keys" / "alice")
    assert (private.name, public.name) == ("alice.key", "alice.pub")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    loaded, verifying = load_signing_key(private), load_verifying_key(public)
    assert loaded.keyid == verifying.keyid == key.keyid
    assert verifying.key_type == key_type
    signature = loaded.sign(b"data")
    assert verifying.verify(signature, b"data")
    assert not verifying.verify(signature, b"datA")
    assert not verifying.verify(b"not a signature", b"data")


def test_keyid_is_sha256_of_der_subject_public_key_info(tmp_path: Path) -> None:
    key = generate_signing_key()
    public = serialization.load_pem_public_key(key.public.to_pem())
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.keyid == hashlib.sha256(der).hexdigest()


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_sslib_keyid_is_the_one_securesystemslib_computes_for_the_key(tmp_path: Path, key_type: str) -> None:
    from securesystemslib.signer import SSlibKey

    key = generate_signing_key(key_type)
    _, public = write_keypair(key, tmp_path / "k")
    expected = SSlibKey.from_crypto(serialization.load_pem_public_key(public.read_bytes())).keyid
    assert load_verifying_key(public).sslib_keyid == key.public.sslib_keyid == expected != key.keyid
    assert load_verifying_key(public).keyids == (key.keyid, expected)


def test_ecdsa_signatures_are_der_over_sha256() -> None:
    key = generate_signing_key("ecdsa-p256")
    public = serialization.load_pem_public_key(key.public.to_pem())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(key.sign(b"payload"), b"payload", ec.ECDSA(hashes.SHA256()))  # raises if not DER/SHA-256


def test_private_key_material_is_never_in_repr(tmp_path: Path) -> None:
    key = generate_signing_key()
    private, _ = write_keypair(key, tmp_path / "k")
    pem_body = b"".join(private.read_bytes().splitlines()[1:-1]).decode()
    for text in (repr(key), str(key), f"{key}"):
        assert key.keyid in text
        assert pem_body[:16] not in text
        assert "_key" not in text


def test_passphrase_from_environment_decrypts_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = generate_signing_key()
    private, _ = write_keypair(key, tmp_path / "k", passphrase=b"s3cret")
    assert b"ENCRYPTED" in private.read_bytes()
    with pytest.raises(KeyFileError, match="TRAINGUARD_KEY_PASSPHRASE"):
        load_signing_key(private)
    monkeypatch.setenv("TRAINGUARD_KEY_PASSPHRASE", "wrong")
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_signing_key(private)
    monkeypatch.setenv("TRAINGUARD_KEY_PASSPHRASE", "s3cret")
    assert load_signing_key(private).keyid == key.keyid


def test_existing_key_is_not_overwritten(tmp_path: Path) -> None:
    write_keypair(generate_signing_key(), tmp_path / "k")
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        write_keypair(generate_signing_key(), tmp_path / "k")


def test_unreadable_or_garbage_key_files_are_bad_input(tmp_path: Path) -> None:
    (tmp_path / "junk.pub").write_text("not pem")
    for call in (
        lambda: load_verifying_key(tmp_path / "missing.pub"),
        lambda: load_verifying_key(tmp_path / "junk.pub"),
        lambda: load_signing_key(tmp_path / "junk.pub"),
    ):
        with pytest.raises(KeyFileError) as caught:
            call()
        assert caught.value.exit_code == 2


def test_a_fifo_or_device_key_file_is_refused_without_hanging(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "fifo.pub")
    for call in (
        lambda: load_verifying_key(tmp_path / "fifo.pub"),
        lambda: load_signing_key(tmp_path / "fifo.pub"),
        lambda: load_verifying_key(Path("/dev/zero")),
    ):
        with pytest.raises(KeyFileError, match="not a regular file") as caught:
            call()
        assert caught.value.exit_code == 2


def test_an_oversized_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "huge.pub").write_bytes(b"A" * (1024 * 1024))
    with pytest.raises(KeyFileError, match="limit"):
        load_verifying_key(tmp_path / "huge.pub")


def test_writing_a_key_pair_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "k.pub").symlink_to(victim)
    (tmp_path / "k.key").symlink_to(victim)
    private, public = write_keypair(generate_signing_key(), tmp_path / "k", overwrite=True)
    assert victim.read_bytes() == b"precious"
    assert not private.is_symlink() and not public.is_symlink()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and load_signing_key(private)


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_a_verifying_key_pickles_as_its_pem_and_still_verifies(key_type: str) -> None:
    import pickle

    key = generate_signing_key(key_type)
    copy = pickle.loads(pickle.dumps(key.public))
    assert copy == key.public and copy.keyid == key.keyid
    assert copy.verify(key.sign(b"shard"), b"shard") and not copy.verify(key.sign(b"shard"), b"other")
