"""DSSE envelopes: PAE, JSON round trip, thresholds and the reasons signatures are refused."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainguard.provenance import (
    AlreadySignedError,
    BadSignatureError,
    Envelope,
    MalformedError,
    PolicyError,
    ProvenanceError,
    ThresholdError,
    UntrustedSignerError,
    add_signature,
    generate_signing_key,
    pae,
    sign_envelope,
    verify_envelope,
)

TYPE = "application/vnd.in-toto+json"


def test_pae_matches_the_dsse_specification() -> None:
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_envelope_round_trips_through_json() -> None:
    key = generate_signing_key("ecdsa-p256")
    envelope = add_signature(sign_envelope(TYPE, b'{"a": 1}', generate_signing_key()), key)
    assert Envelope.from_json(envelope.to_json()) == envelope
    assert Envelope.from_json(envelope.to_json().decode()) == envelope
    document = json.loads(envelope.to_json())
    assert base64.b64decode(document["payload"]) == b'{"a": 1}'
    assert document["payloadType"] == TYPE


def test_two_of_three_threshold_needs_two_trusted_signers() -> None:
    a, b, c = (generate_signing_key() for _ in range(3))
    trusted = [a.public, b.public, c.public]
    one = sign_envelope(TYPE, b"x", a)
    with pytest.raises(ThresholdError):
        verify_envelope(one, trusted, 2)
    assert verify_envelope(add_signature(one, c), trusted, 2) == (a.keyid, c.keyid)


def test_the_same_key_twice_counts_once() -> None:
    a, b = generate_signing_key(), generate_signing_key()
    envelope = sign_envelope(TYPE, b"x", a)
    with pytest.raises(AlreadySignedError):
        add_signature(envelope, a)
    forged = Envelope(envelope.payload_type, envelope.payload, envelope.signatures * 2)
    with pytest.raises(ThresholdError):
        verify_envelope(forged, [a.public, b.public], 2)


def test_edited_payload_or_payload_type_is_a_bad_signature() -> None:
    key = generate_signing_key()
    envelope = sign_envelope(TYPE, b"x", key)
    for edited in (
        Envelope(envelope.payload_type, b"y", envelope.signatures),
        Envelope("text/plain", envelope.payload, envelope.signatures),
    ):
        with pytest.raises(BadSignatureError) as caught:
            verify_envelope(edited, [key.public], 1)
        assert caught.value.reason == "bad-signature"


def test_untrusted_signer_is_refused() -> None:
    trusted, other = generate_signing_key(), generate_signing_key()
    with pytest.raises(UntrustedSignerError):
        verify_envelope(sign_envelope(TYPE, b"x", other), [trusted.public], 1)


def test_untrusted_key_claiming_a_trusted_keyid_is_refused() -> None:
    trusted, other = generate_signing_key(), generate_signing_key()
    envelope = sign_envelope(TYPE, b"x", other)
    forged = Envelope(TYPE, b"x", (type(envelope.signatures[0])(trusted.keyid, envelope.signatures[0].sig),))
    with pytest.raises(BadSignatureError):
        verify_envelope(forged, [trusted.public], 1)


def test_threshold_out_of_range_is_a_policy_error() -> None:
    key = generate_signing_key()
    envelope = sign_envelope(TYPE, b"x", key)
    for threshold in (0, 2):
        with pytest.raises(PolicyError):
            verify_envelope(envelope, [key.public], threshold)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=10,
)
envelope_like = st.fixed_dictionaries(
    {},
    optional={
        "payload": st.one_of(st.text(max_size=20), json_values),
        "payloadType": st.one_of(st.just(TYPE), json_values),
        "signatures": st.one_of(
            st.lists(st.fixed_dictionaries({}, optional={"keyid": json_values, "sig": st.text(max_size=30)})),
            json_values,
        ),
    },
)


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.binary(max_size=64), envelope_like.map(lambda d: json.dumps(d).encode())))
def test_malformed_envelopes_raise_only_the_project_error(data: bytes) -> None:
    key = generate_signing_key()
    try:
        envelope = Envelope.from_json(data)
    except ProvenanceError as error:
        assert isinstance(error, MalformedError)
        return
    with pytest.raises(ProvenanceError):
        verify_envelope(envelope, [key.public], 1)


def test_deeply_nested_json_is_malformed_not_a_crash() -> None:
    with pytest.raises(MalformedError):
        Envelope.from_json(b"[" * 100_000)


def _document(envelope: Envelope) -> dict:
    return json.loads(envelope.to_json())


@pytest.mark.parametrize(
    "raw",
    [
        b'{"payload": "", "payload": "", "payloadType": "t", "signatures": []}',
        b'\xef\xbb\xbf{"payload": "", "payloadType": "t", "signatures": []}',
        b'{"payload": "", "payloadType": "t", "signatures": [], "x": NaN}',
        b'{"payload": "", "payloadType": "t", "signatures": [], "x": 1e400}',
        b'{"payload": "", "payloadType": "t\xff", "signatures": []}',
    ],
    ids=["duplicate-key", "bom", "nan", "overflow", "non-utf8"],
)
def test_ambiguous_envelope_json_is_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedError) as caught:
        Envelope.from_json(raw)
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    "spelling",
    ["eyJhIjogMX0", "eyJhIjogMX0===", " eyJhIjogMX0=", "eyJhIjog\nMX0=", "eyJhIjogMX1=", "eyJh-Ijog+MX0="],
    ids=["missing-padding", "extra-padding", "whitespace", "newline", "trailing-bits", "mixed-alphabets"],
)
def test_non_canonical_base64_is_malformed(spelling: str) -> None:
    document = _document(sign_envelope(TYPE, b'{"a": 1}', generate_signing_key()))
    document["payload"] = spelling
    with pytest.raises(MalformedError, match="base64"):
        Envelope.from_json(json.dumps(document))


def test_url_safe_base64_is_accepted_when_canonical() -> None:
    payload = b"\xfb\xff\xfe-payload"
    envelope = sign_envelope(TYPE, payload, generate_signing_key())
    document = _document(envelope)
    document["payload"] = base64.urlsafe_b64encode(payload).decode()
    assert "-" in document["payload"] or "_" in document["payload"]
    assert Envelope.from_json(json.dumps(document)).payload == payload


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=40), st.sampled_from(["", "=", "\n", " "]))
def test_only_the_canonical_spelling_of_bytes_parses(data: bytes, suffix: str) -> None:
    document = _document(sign_envelope(TYPE, b"x", generate_signing_key()))
    document["payload"] = base64.b64encode(data).decode() + suffix
    try:
        parsed = Envelope.from_json(json.dumps(document))
    except MalformedError:
        assert suffix
    else:
        assert not suffix and parsed.payload == data


def test_envelopes_with_too_many_signatures_are_malformed() -> None:
    from trainguard.provenance.dsse import MAX_SIGNATURES

    key = generate_signing_key()
    document = _document(sign_envelope(TYPE, b"x", key))
    document["signatures"] = document["signatures"] * (MAX_SIGNATURES + 1)
    with pytest.raises(MalformedError, match=f"{MAX_SIGNATURES + 1} signatures"):
        Envelope.from_json(json.dumps(document))
    envelope = Envelope(TYPE, b"x", sign_envelope(TYPE, b"x", key).signatures * (MAX_SIGNATURES + 1))
    with pytest.raises(MalformedError, match="signatures"):
        verify_envelope(envelope, [key.public], 1)


def test_a_signature_is_checked_only_against_the_key_its_keyid_names() -> None:
    from dataclasses import replace

    from trainguard.provenance.keys import VerifyingKey

    trusted, stranger = generate_signing_key(), generate_signing_key()
    checked: list[str] = []

    class Counting(VerifyingKey):
        def verify(self, signature: bytes, data: bytes) -> bool:
            checked.append(self.keyid)
            return super().verify(signature, data)

    counting = Counting(trusted.public.keyid, trusted.key_type, trusted.public._key)
    envelope = sign_envelope(TYPE, b"x", trusted)
    unknown = replace(envelope.signatures[0], keyid="unknown")
    with pytest.raises(UntrustedSignerError):
        verify_envelope(replace(envelope, signatures=(unknown,) * 16), [counting], 1)
    assert checked == []  # a trusted key's signature under an unknown keyid counts for nothing, and costs nothing
    with pytest.raises(UntrustedSignerError):
        verify_envelope(sign_envelope(TYPE, b"x", stranger), [counting], 1)
    assert checked == []
    assert verify_envelope(envelope, [counting], 1) == (trusted.keyid,)
    assert checked == [trusted.keyid]
