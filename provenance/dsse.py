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
    """DSSEv1 pre-authentication encoding: what is actually signed, binding the payload type to the payload.

    Args:
        payload_type: The envelope's payloadType (encoded as UTF-8).
        payload: The payload bytes.

    Returns:
        `b"DSSEv1 <len(type)> <type> <len(payload)> <payload>"`, the message every signature is made over.
    """
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


@dataclass(frozen=True)
class Signature:
    """One signature of a DSSE envelope, over `pae(payload_type, payload)`.

    Attributes:
        keyid: The label of the key that made it: trainguard signs with `VerifyingKey.sslib_keyid`, as
            securesystemslib does; a key's `keyid` (older envelopes) is accepted too. Empty when the JSON gave none.
        sig: The raw signature bytes (base64 in the envelope's JSON).
    """

    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    """A DSSE envelope: a typed payload and the signatures over its pre-authentication encoding (`pae`).

    Attributes:
        payload_type: The payload's media type; a manifest's is `PAYLOAD_TYPE` (in-toto JSON).
        payload: The signed bytes (for a manifest, its canonical in-toto statement).
        signatures: The signatures; `from_json` and `verify_envelope` refuse more than MAX_SIGNATURES.
    """

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
    """Signs a payload into a new envelope, so its type and bytes cannot change without breaking the signature.

    Args:
        payload_type: The payload's media type (`PAYLOAD_TYPE` for a manifest).
        payload: The bytes to sign.
        key: The private key that signs.

    Returns:
        An envelope whose only signature is `key`'s over `pae(payload_type, payload)`.
    """
    return Envelope(payload_type, payload, (_signature(payload_type, payload, key),))


def add_signature(envelope: Envelope, key: SigningKey) -> Envelope:
    """The envelope with one more signature (co-signing, for k-of-n policies); a key signs an envelope at most once.

    Args:
        envelope: The envelope to co-sign; it is not changed.
        key: The private key whose signature is added.

    Returns:
        A copy of `envelope` with `key`'s signature after the existing ones.

    Raises:
        AlreadySignedError: The envelope already holds a signature labelled with either of `key`'s keyids.
    """
    if any(s.keyid in key.public.keyids for s in envelope.signatures):
        raise AlreadySignedError(f"the envelope is already signed by key {key.keyid}", keyid=key.keyid)
    signature = _signature(envelope.payload_type, envelope.payload, key)
    return replace(envelope, signatures=(*envelope.signatures, signature))


def _signature(payload_type: str, payload: bytes, key: SigningKey) -> Signature:
    """`key`'s signature over the PAE, labelled with securesystemslib's keyid so its verifier finds it."""
    return Signature(key.public.sslib_keyid, key.sign(pae(payload_type, payload)))


def verify_envelope(envelope: Envelope, trusted: Sequence[VerifyingKey], threshold: int) -> tuple[str, ...]:
    """Keyids of the distinct trusted keys whose signatures verify; raises when fewer than `threshold` do.

    A signature is checked only against the trusted key its keyid names, by either of the key's keyids (one check
    per signature, at most MAX_SIGNATURES; a key counts once however its signatures are labelled). The reason says
    why: a trusted key's signature that fails (payload edited), no trusted signer at all, or too few.

    Args:
        envelope: The signed envelope.
        trusted: The keys whose signatures count; signatures by any other keyid are skipped.
        threshold: How many distinct trusted keys must have signed, from 1 to the number of trusted keys.

    Returns:
        The keyids (`VerifyingKey.keyid`) of the trusted keys whose signatures verify, in signature order.

    Raises:
        PolicyError: No trusted keys, or `threshold` out of range.
        MalformedError: The envelope holds more than MAX_SIGNATURES signatures.
        BadSignatureError: Below the threshold, and a trusted key's signature does not verify.
        UntrustedSignerError: No signature is by a trusted key.
        ThresholdError: Fewer trusted keys signed than `threshold`.
    """
    distinct = {key.keyid: key for key in trusted}
    if not distinct:
        raise PolicyError("no trusted keys given")
    if not 1 <= threshold <= len(distinct):
        raise PolicyError(f"threshold {threshold} is out of range for {len(distinct)} trusted key(s)")
    _check_count(len(envelope.signatures))
    keys = {label: key for key in distinct.values() for label in key.keyids}
    message = pae(envelope.payload_type, envelope.payload)
    valid: list[str] = []
    failed: list[str] = []
    for signature in envelope.signatures:
        key = keys.get(signature.keyid)
        if key is None or key.keyid in valid:
            continue
        if key.verify(signature.sig, message):
            valid.append(key.keyid)
        else:
            failed.append(key.keyid)
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
