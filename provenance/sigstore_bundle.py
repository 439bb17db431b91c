"""Sigstore bundles (v0.3, key-based) of DSSE envelopes: how a trainguard signature travels to other tools.

A DSSE envelope written at `NAME.json` gets a Sigstore bundle beside it at `NAME.sigstore.json`: the same payload and
one signer's signature, with a `publicKey` hint as verification material (hex SHA-256 of the signer's PEM public key,
the hint OpenSSF model-signing writes and checks) and no transparency-log entry, since keyless signing needs Fulcio
and Rekor, which is to say a network. Tools that take a key and a bundle verify it: model-signing's key verifier,
sigstore-js (`@sigstore/verify`) and `cosign verify-blob-attestation --key --bundle --new-bundle-format`.
trainguard itself goes on verifying the DSSE envelope, which may carry several signatures (k of n).
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Final

from trainguard.files import atomic_write
from trainguard.provenance.dsse import Envelope, Signature, pae
from trainguard.provenance.errors import UntrustedSignerError
from trainguard.provenance.keys import VerifyingKey

BUNDLE_MEDIA_TYPE: Final = "application/vnd.dev.sigstore.bundle.v0.3+json"
BUNDLE_SUFFIX = ".sigstore.json"


def bundle_path(envelope_path: Path) -> Path:
    """Where the bundle of an envelope file lives: `NAME.json` -> `NAME.sigstore.json` beside it.

    Args:
        envelope_path: The DSSE envelope's file (a name without `.json` gets the suffix appended).

    Returns:
        The bundle's path.
    """
    path = Path(envelope_path)
    return path.with_name(path.name.removesuffix(".json") + BUNDLE_SUFFIX)


def key_hint(key: VerifyingKey) -> str:
    """The bundle's public-key hint for `key`: hex SHA-256 of its PEM SubjectPublicKeyInfo, as model-signing makes
    it (its verifier refuses a bundle whose hint names another key)."""
    return hashlib.sha256(key.to_pem()).hexdigest()


def bundle_json(envelope: Envelope, key: VerifyingKey) -> bytes:
    """The Sigstore bundle of `key`'s signature in `envelope`, as JSON bytes.

    Args:
        envelope: A signed DSSE envelope.
        key: The signer whose signature the bundle carries (checked first: a bundle never holds a bad signature).

    Returns:
        The bundle (`BUNDLE_MEDIA_TYPE`), with a final newline.

    Raises:
        UntrustedSignerError: No signature of `key` in the envelope verifies.
    """
    from sigstore_models.bundle.v1 import Bundle, VerificationMaterial
    from sigstore_models.common.v1 import PublicKeyIdentifier
    from sigstore_models.intoto import Envelope as BundleEnvelope
    from sigstore_models.intoto import Signature as BundleSignature

    signature = _signature_of(envelope, key)
    bundle = Bundle(
        media_type=BUNDLE_MEDIA_TYPE,
        verification_material=VerificationMaterial(public_key=PublicKeyIdentifier(hint=key_hint(key)), tlog_entries=[]),
        dsse_envelope=BundleEnvelope(
            payload=base64.b64encode(envelope.payload),
            payload_type=envelope.payload_type,
            signatures=[BundleSignature(sig=base64.b64encode(signature.sig), keyid=signature.keyid or None)],
        ),
    )
    return bundle.to_json().encode() + b"\n"


def write_bundle(envelope: Envelope, key: VerifyingKey, envelope_path: Path) -> Path:
    """Writes the bundle of `key`'s signature in `envelope` beside the envelope's file, atomically.

    Args:
        envelope: The signed envelope (written, or to be written, at `envelope_path`).
        key: The signer whose signature the bundle carries.
        envelope_path: The envelope's file; the bundle goes to `bundle_path(envelope_path)`.

    Returns:
        The bundle's path.

    Raises:
        UntrustedSignerError: No signature of `key` in the envelope verifies.
    """
    out = bundle_path(envelope_path)
    atomic_write(out, bundle_json(envelope, key))
    return out


def _signature_of(envelope: Envelope, key: VerifyingKey) -> Signature:
    message = pae(envelope.payload_type, envelope.payload)
    for signature in envelope.signatures:
        if signature.keyid in key.keyids and key.verify(signature.sig, message):
            return signature
    raise UntrustedSignerError(f"the envelope holds no valid signature of key {key.keyid}", keyid=key.keyid)
