"""DSSE envelopes (https://github.com/secure-systems-lab/dsse): signatures over the pre-authentication encoding."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace

from trainguard.provenance.errors import (
    AlreadySignedError,
    BadSignatureError,
    MalformedError,
    PolicyError,
    ThresholdError,
    UntrustedSignerError,
)
from trainguard.provenance.keys import SigningKey, VerifyingKey


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

    def to_json(self) -> bytes:
        document = {
            "payload": base64.b64encode(self.payload).decode(),
            "payloadType": self.payload_type,
            "signatures": [{"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode()} for s in self.signatures],
        }
        return json.dumps(document, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes | str) -> Envelope:
        """Parses a DSSE JSON envelope; anything malformed raises MalformedError (exit 2)."""
        try:
            document = json.loads(data)
        except (ValueError, TypeError, RecursionError) as error:
            raise MalformedError(f"envelope is not JSON: {error}") from None
        if not isinstance(document, dict):
            raise MalformedError("envelope is not a JSON object")
        payload_type = document.get("payloadType")
        if not isinstance(payload_type, str):
            raise MalformedError("envelope has no string payloadType")
        payload = _b64(document.get("payload"), "payload")
        raw_signatures = document.get("signatures")
        if not isinstance(raw_signatures, list):
            raise MalformedError("envelope has no signatures list")
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
    if not isinstance(value, str):
        raise MalformedError(f"envelope {what} is not a base64 string")
    text = value.strip()
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedError(f"envelope {what} is not valid base64") from None


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

    The reason says why: a trusted key's signature that fails (payload edited), no trusted signer at all, or too few.
    """
    keys = {key.keyid: key for key in trusted}
    if not keys:
        raise PolicyError("no trusted keys given")
    if not 1 <= threshold <= len(keys):
        raise PolicyError(f"threshold {threshold} is out of range for {len(keys)} trusted key(s)")
    message = pae(envelope.payload_type, envelope.payload)
    valid: list[str] = []
    failed: list[str] = []
    for signature in envelope.signatures:
        candidates = [keys[signature.keyid]] if signature.keyid in keys else list(keys.values())
        match = next((k.keyid for k in candidates if k.verify(signature.sig, message)), None)
        if match is not None:
            if match not in valid:
                valid.append(match)
        elif signature.keyid in keys:
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
