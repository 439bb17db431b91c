"""DSSE envelopes (https://github.com/secure-systems-lab/dsse): signatures over the pre-authentication encoding."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace

from trainguard import strictjson
from trainguard.provenance.errors import (
    AlreadySignedError,
    BadSignatureError,
    MalformedError,
    PolicyError,
    ThresholdError,
    UntrustedSignerError,
)
from trainguard.provenance.keys import SigningKey, VerifyingKey

MAX_SIGNATURES = 16
"""The most signatures an envelope may carry: each one costs a signature check, so the count is bounded."""


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSEv1 pre-authentication encoding: what is actually signed, binding the payload type to the payload."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]

    def to_json(self, indent: int | None = 2) -> bytes:
        """The envelope as JSON: indented with a final newline, or on one line (`indent=None`, for logs)."""
        document = {
            "payload": base64.b64encode(self.payload).decode(),
            "payloadType": self.payload_type,
            "signatures": [{"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode()} for s in self.signatures],
        }
        if indent is None:
            return json.dumps(document, separators=(",", ":")).encode()
        return json.dumps(document, indent=indent).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes | str) -> Envelope:
        """Parses a DSSE JSON envelope strictly (no duplicate keys, BOM, NaN, non-canonical base64, at most
        MAX_SIGNATURES signatures); anything malformed raises MalformedError (exit 2)."""
        try:
            document = strictjson.loads(data)
        except strictjson.StrictJSONError as error:
            raise MalformedError(f"envelope is not strict JSON: {error}") from None
        if not isinstance(document, dict):
            raise MalformedError("envelope is not a JSON object")
        payload_type = document.get("payloadType")
        if not isinstance(payload_type, str):
            raise MalformedError("envelope has no string payloadType")
        payload = _b64(document.get("payload"), "payload")
        raw_signatures = document.get("signatures")
        if not isinstance(raw_signatures, list):
            raise MalformedError("envelope has no signatures list")
        _check_count(len(raw_signatures))
        signatures = []
        for index, raw in enumerate(raw_signatures):
            if not isinstance(raw, dict):
                raise MalformedError(f"signature {index} is not an object")
            keyid = raw.get("keyid", "")
            if not isinstance(keyid, str):
                raise MalformedError(f"signature {index} has a non-string keyid")
            signatures.append(Signature(keyid=keyid, sig=_b64(raw.get("sig"), f"signature {index}")))
        return cls(payload_type=payload_type, payload=payload, signatures=tuple(signatures))


def _b64(value: object, what: str) -> bytes:
    """Canonical base64 only (standard or URL-safe alphabet, as DSSE allows): re-encoding the bytes must give back
    exactly `value`, so one envelope has one spelling (no whitespace, padding variants or stray trailing bits)."""
    if not isinstance(value, str):
        raise MalformedError(f"envelope {what} is not a base64 string")
    urlsafe = "-" in value or "_" in value
    try:
        if not value.isascii() or (urlsafe and ("+" in value or "/" in value)):
            raise ValueError("mixed alphabets or non-ASCII")
        decoded = base64.b64decode(value.translate(_FROM_URLSAFE) if urlsafe else value, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedError(f"envelope {what} is not valid base64") from None
    encoded = base64.urlsafe_b64encode(decoded) if urlsafe else base64.b64encode(decoded)
    if encoded.decode() != value:
        raise MalformedError(f"envelope {what} is not canonical base64 (padding, whitespace or trailing bits)")
    return decoded


_FROM_URLSAFE = str.maketrans("-_", "+/")


def _check_count(count: int) -> None:
    if count > MAX_SIGNATURES:
        raise MalformedError(f"envelope has {count} signatures, more than the {MAX_SIGNATURES} allowed")


def sign_envelope(payload_type: str, payload: bytes, key: SigningKey) -> Envelope:
    return Envelope(payload_type, payload, (Signature(key.keyid, key.sign(pae(payload_type, payload))),))


def add_signature(envelope: Envelope, key: SigningKey) -> Envelope:
    """The envelope with one more signature; a key signs an envelope at most once."""
    if any(s.keyid == key.keyid for s in envelope.signatures):
        raise AlreadySignedError(f"the envelope is already signed by key {key.keyid}", keyid=key.keyid)
    signature = Signature(key.keyid, key.sign(pae(envelope.payload_type, envelope.payload)))
    return replace(envelope, signatures=(*envelope.signatures, signature))


def verify_envelope(envelope: Envelope, trusted: Sequence[VerifyingKey], threshold: int) -> tuple[str, ...]:
    """Keyids of the distinct trusted keys whose signatures verify; raises when fewer than `threshold` do.

    A signature is checked only against the trusted key its keyid names (one check per signature, at most
    MAX_SIGNATURES). The reason says why: a trusted key's signature that fails (payload edited), no trusted signer
    at all, or too few.
    """
    keys = {key.keyid: key for key in trusted}
    if not keys:
        raise PolicyError("no trusted keys given")
    if not 1 <= threshold <= len(keys):
        raise PolicyError(f"threshold {threshold} is out of range for {len(keys)} trusted key(s)")
    _check_count(len(envelope.signatures))
    message = pae(envelope.payload_type, envelope.payload)
    valid: list[str] = []
    failed: list[str] = []
    for signature in envelope.signatures:
        key = keys.get(signature.keyid)
        if key is None or signature.keyid in valid:
            continue
        if key.verify(signature.sig, message):
            valid.append(signature.keyid)
        else:
            failed.append(signature.keyid)
    if len(valid) >= threshold:
        return tuple(valid)
    if failed:
        raise BadSignatureError(
            f"signature of trusted key {failed[0]} does not verify: the manifest was changed after signing",
            keyid=failed[0],
        )
    if not valid:
        signers = ", ".join(s.keyid or "<no keyid>" for s in envelope.signatures) or "none"
        raise UntrustedSignerError(f"no signature from a trusted key (signed by: {signers})")
    raise ThresholdError(f"{len(valid)} of {threshold} required trusted signatures ({', '.join(valid)})")
