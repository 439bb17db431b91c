"""Manifests travel in ecosystem formats: a Sigstore bundle beside each DSSE envelope, checked by the real tools
(Sigstore's bundle model, model-signing's key verifier, securesystemslib's DSSE verifier), and keyids that
securesystemslib computes for the same key."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from model_signing._signing import sign_ec_key, sign_sigstore_pb
from securesystemslib.dsse import Envelope as SslibEnvelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import SSlibKey
from sigstore_models.bundle.v1 import Bundle

from tests.provenance.conftest import Keys
from trainguard.provenance import (
    PAYLOAD_TYPE,
    AlreadySignedError,
    Envelope,
    SigningKey,
    ThresholdError,
    TrustPolicy,
    UntrustedSignerError,
    add_signature,
    bundle_path,
    cosign_manifest,
    generate_signing_key,
    sign_dataset,
    sign_envelope,
    verify_dataset,
    verify_envelope,
    write_keypair,
    write_manifest,
)
from trainguard.provenance.sigstore_bundle import BUNDLE_MEDIA_TYPE, key_hint


def _signed_manifest(tmp_path: Path, key: SigningKey, inside: bool = False) -> Path:
    """A two-shard synthetic dataset signed by `key`, its manifest beside the folder (or inside it)."""
    data = tmp_path / "data"
    (data / "alice").mkdir(parents=True)
    (data / "alice" / "part-0.csv").write_text("x,label\n0.5,1\n")
    (data / "part-1.bin").write_bytes(bytes(range(64)))
    out = (data if inside else tmp_path) / "data.manifest.json"
    envelope, _ = sign_dataset(data, key, dataset="synthetic", source="alice", exclude=(out,))
    return write_manifest(envelope, out, key.public)


def _flip_payload_byte(bundle: Path) -> None:
    """Flips one bit of one byte of the signed payload inside the bundle (the JSON stays well-formed)."""
    document = json.loads(bundle.read_text())
    payload = bytearray(base64.b64decode(document["dsseEnvelope"]["payload"]))
    payload[len(payload) // 2] ^= 0x01
    document["dsseEnvelope"]["payload"] = base64.b64encode(bytes(payload)).decode()
    bundle.write_text(json.dumps(document))


def _sslib_verify(envelope_json: dict[str, object], key: SigningKey) -> None:
    """securesystemslib's own DSSE check, with the key as securesystemslib builds it from the public key (on a copy:
    its parser rewrites the dict it is given)."""
    SslibEnvelope.from_dict(json.loads(json.dumps(envelope_json))).verify([SSlibKey.from_crypto(key.public._key)], 1)


@pytest.mark.parametrize("signer", ["alice", "bob"])  # Ed25519 and ECDSA P-256
def test_a_manifest_bundle_is_a_sigstore_bundle_of_the_envelopes_signature(
    tmp_path: Path, key_pairs: Keys, signer: str
) -> None:
    key: SigningKey = getattr(key_pairs, signer)
    manifest = _signed_manifest(tmp_path, key)
    bundle = bundle_path(manifest)
    assert bundle.name == "data.manifest.sigstore.json"
    parsed = Bundle.from_json(bundle.read_text())  # Sigstore's bundle model (protobuf-specs v0.3) accepts it
    assert parsed.media_type == BUNDLE_MEDIA_TYPE
    assert parsed.verification_material.public_key is not None
    assert parsed.verification_material.public_key.hint == key_hint(key.public)
    envelope = Envelope.from_json(manifest.read_bytes())
    assert parsed.dsse_envelope is not None and parsed.dsse_envelope.payload == envelope.payload
    _sslib_verify(json.loads(bundle.read_text())["dsseEnvelope"], key)
    _flip_payload_byte(bundle)
    with pytest.raises(VerificationError):
        _sslib_verify(json.loads(bundle.read_text())["dsseEnvelope"], key)


def test_model_signings_key_verifier_accepts_a_manifest_bundle_and_refuses_it_after_a_one_byte_flip(
    tmp_path: Path, key_pairs: Keys
) -> None:
    manifest = _signed_manifest(tmp_path, key_pairs.bob)  # model-signing verifies EC keys only
    bundle = bundle_path(manifest)
    verifier = sign_ec_key.Verifier(key_pairs.pub("bob"))
    payload_type, payload = verifier._verify_signed_content(sign_sigstore_pb.Signature.read(bundle))
    assert (payload_type, payload) == (PAYLOAD_TYPE, Envelope.from_json(manifest.read_bytes()).payload)
    _, stranger = write_keypair(generate_signing_key("ecdsa-p256"), tmp_path / "stranger")
    with pytest.raises(ValueError, match="Key mismatch"):  # another key is refused by the hint
        sign_ec_key.Verifier(stranger)._verify_signed_content(sign_sigstore_pb.Signature.read(bundle))
    _flip_payload_byte(bundle)
    with pytest.raises(InvalidSignature):
        verifier._verify_signed_content(sign_sigstore_pb.Signature.read(bundle))


@pytest.mark.parametrize("signer", ["alice", "bob"])
def test_securesystemslib_verifies_a_manifest_envelope_and_refuses_an_edited_one(
    tmp_path: Path, key_pairs: Keys, signer: str
) -> None:
    key: SigningKey = getattr(key_pairs, signer)
    manifest = _signed_manifest(tmp_path, key)
    document = json.loads(manifest.read_text())
    assert document["signatures"][0]["keyid"] == SSlibKey.from_crypto(key.public._key).keyid
    _sslib_verify(document, key)
    with pytest.raises(VerificationError):
        _sslib_verify({**document, "payloadType": "application/json"}, key)


def test_an_envelope_labelled_with_trainguards_older_keyid_still_verifies(key_pairs: Keys) -> None:
    key = key_pairs.alice
    signed = sign_envelope(PAYLOAD_TYPE, b"{}", key)
    older = Envelope(PAYLOAD_TYPE, b"{}", (type(signed.signatures[0])(key.keyid, signed.signatures[0].sig),))
    assert verify_envelope(older, [key.public], 1) == (key.keyid,)
    assert verify_envelope(signed, [key.public], 1) == (key.keyid,)  # callers see trainguard's keyid either way
    with pytest.raises(AlreadySignedError):
        add_signature(older, key)


def test_a_key_counts_once_however_its_signatures_are_labelled(key_pairs: Keys) -> None:
    key, other = key_pairs.alice, key_pairs.carol
    signed = sign_envelope(PAYLOAD_TYPE, b"{}", key)
    relabelled = type(signed.signatures[0])(key.keyid, signed.signatures[0].sig)
    twice = Envelope(PAYLOAD_TYPE, b"{}", (signed.signatures[0], relabelled))
    with pytest.raises(ThresholdError):
        verify_envelope(twice, [key.public, other.public], 2)


def test_a_policy_may_pin_a_key_by_either_keyid(tmp_path: Path, key_pairs: Keys) -> None:
    from trainguard.provenance import PolicyError, load_trust

    key = key_pairs.alice.public
    for pin in key.keyids:
        (tmp_path / "policy.json").write_text(
            json.dumps({"keys": [{"path": str(key_pairs.pub("alice")), "keyid": pin}]})
        )
        assert load_trust(tmp_path / "policy.json").keyids == (key.keyid,)
    (tmp_path / "policy.json").write_text(
        json.dumps({"keys": [{"path": str(key_pairs.pub("alice")), "keyid": "0" * 64}]})
    )
    with pytest.raises(PolicyError, match="pins"):
        load_trust(tmp_path / "policy.json")


def test_no_bundle_is_written_for_a_key_that_did_not_sign(tmp_path: Path, key_pairs: Keys) -> None:
    envelope = sign_envelope(PAYLOAD_TYPE, b"{}", key_pairs.alice)
    out = tmp_path / "x.manifest.json"
    with pytest.raises(UntrustedSignerError):
        write_manifest(envelope, out, key_pairs.carol.public)
    assert not out.exists() and not bundle_path(out).exists()


def test_a_bundle_inside_the_data_folder_is_neither_signed_nor_unlisted(tmp_path: Path, key_pairs: Keys) -> None:
    manifest = _signed_manifest(tmp_path, key_pairs.alice, inside=True)
    assert bundle_path(manifest).parent == manifest.parent
    resigned, _ = sign_dataset(manifest.parent, key_pairs.alice, source="alice", exclude=(manifest,))
    assert Envelope.from_json(manifest.read_bytes()).payload.count(b'"name"') == resigned.payload.count(b'"name"')
    report = verify_dataset(manifest, TrustPolicy.of([key_pairs.alice.public]), state=tmp_path / "state.json")
    assert report.ok, report.failures


def test_cosigning_keeps_the_first_signers_bundle_valid(tmp_path: Path, key_pairs: Keys) -> None:
    manifest = _signed_manifest(tmp_path, key_pairs.alice)
    before = bundle_path(manifest).read_bytes()
    cosign_manifest(manifest, key_pairs.carol)
    assert bundle_path(manifest).read_bytes() == before
    _sslib_verify(json.loads(before)["dsseEnvelope"], key_pairs.alice)
    document = json.loads(manifest.read_text())  # the co-signed envelope: both keys, as securesystemslib labels them
    keys = [SSlibKey.from_crypto(k.public._key) for k in (key_pairs.alice, key_pairs.carol)]
    assert set(SslibEnvelope.from_dict(document).verify(keys, 2)) == {k.keyid for k in keys}


@pytest.mark.parametrize(
    ("envelope", "bundle"),
    [
        ("data/train.manifest.json", "data/train.manifest.sigstore.json"),
        ("model/attestation.intoto.json", "model/attestation.intoto.sigstore.json"),
        ("top-level", "top-level.sigstore.json"),
    ],
)
def test_a_bundle_lives_beside_its_envelope(envelope: str, bundle: str) -> None:
    assert bundle_path(Path(envelope)) == Path(bundle)
