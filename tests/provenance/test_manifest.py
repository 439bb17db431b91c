"""The manifest statement: round trip, strict parsing (only MalformedError), safe names, policies, state."""

from __future__ import annotations

import hashlib
import json
import string
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainguard.provenance import (
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    Manifest,
    ProvenanceError,
    ShardEntry,
    load_trust,
    parse_statement,
)
from trainguard.provenance.errors import MalformedError, PolicyError
from trainguard.provenance.manifest import statement_bytes, to_statement
from trainguard.provenance.paths import name_problem

segment = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=8)
names = st.lists(segment, min_size=1, max_size=3).map("/".join)
hexes = st.binary(min_size=1, max_size=8).map(lambda b: hashlib.sha256(b).hexdigest())
shards = st.builds(
    ShardEntry,
    name=names,
    sha256=hexes,
    size=st.integers(0, 10**6),
    source=st.sampled_from(["alice", "bob", "curator"]),
    role=st.sampled_from(["train", "holdout"]),
    records=st.none() | st.integers(0, 1000),
    blake3=st.none() | hexes,
)
manifests = st.builds(
    Manifest,
    dataset=st.sampled_from(["digits", "data-1"]),
    version=st.integers(0, 10**6),
    created=st.just(datetime(2026, 1, 1, tzinfo=UTC)),
    expires=st.just(datetime(2026, 2, 1, tzinfo=UTC)),
    shards=st.lists(shards, max_size=4).map(tuple),
    shuffle_seed=st.none() | st.integers(0, 2**32),
)


@settings(max_examples=40, deadline=None)
@given(manifests)
def test_statement_round_trips(manifest: Manifest) -> None:
    assert parse_statement(statement_bytes(manifest)) == manifest


def test_statement_is_in_toto_v1_with_one_subject_per_shard() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    shard = ShardEntry("a/b.parquet", "0" * 64, 10, "alice", "train", 5)
    statement = to_statement(Manifest("digits", 2, now, now + timedelta(days=1), (shard,)))
    assert statement["_type"] == STATEMENT_TYPE
    assert statement["predicateType"] == PREDICATE_TYPE
    assert statement["subject"] == [{"name": "a/b.parquet", "digest": {"sha256": "0" * 64}}]
    assert statement["predicate"]["expires"] == "2026-01-02T00:00:00Z"
    assert statement["predicate"]["shards"][0] == {
        "name": "a/b.parquet",
        "size": 10,
        "records": 5,
        "source": "alice",
        "role": "train",
    }


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)


def _mutations(manifest: Manifest) -> st.SearchStrategy[bytes]:
    statement = to_statement(manifest)

    def mutate(path_and_value: tuple[int, object]) -> bytes:
        index, value = path_and_value
        document = json.loads(json.dumps(statement))
        targets = [
            (document, "_type"),
            (document, "predicateType"),
            (document, "subject"),
            (document, "predicate"),
            (document["predicate"], "version"),
            (document["predicate"], "expires"),
            (document["predicate"], "shards"),
            (document["predicate"], "chunkSize"),
            (document["predicate"], "dataset"),
        ]
        if document["subject"]:
            targets += [
                (document["subject"][0], "name"),
                (document["subject"][0], "digest"),
                (document["predicate"]["shards"][0], "size"),
                (document["predicate"]["shards"][0], "role"),
                (document["predicate"]["shards"][0], "chunks"),
            ]
        parent, key = targets[index % len(targets)]
        parent[key] = value
        return json.dumps(document).encode()

    return st.tuples(st.integers(0, 50), json_values).map(mutate)


@settings(max_examples=80, deadline=None)
@given(
    st.one_of(st.binary(max_size=40), json_values.map(lambda v: json.dumps(v).encode()), manifests.flatmap(_mutations))
)
def test_malformed_statements_raise_only_the_project_error(payload: bytes) -> None:
    try:
        parse_statement(payload)
    except ProvenanceError as error:
        assert isinstance(error, MalformedError)
        assert error.exit_code == 2


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="ab./\\:\x00", max_size=10))
def test_safe_names_are_relative_normalized_and_never_escape(name: str) -> None:
    if name_problem(name) is None:
        assert not name.startswith("/") and ".." not in name.split("/")
        assert Path("/root", name).resolve().is_relative_to("/root")
        assert "//" not in name and not name.endswith("/") and "." not in name.split("/")


@pytest.mark.parametrize("shuffle", [{"seed": -1}, {"seed": "0"}, {"seed": 0, "order": [1]}, [0], True])
def test_a_shuffle_record_other_than_a_seed_is_malformed(shuffle: object) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    statement = to_statement(Manifest("digits", 1, now, now, (), shuffle_seed=3))
    assert statement["predicate"]["shuffle"] == {"seed": 3}
    statement["predicate"]["shuffle"] = shuffle
    with pytest.raises(MalformedError, match="shuffle"):
        parse_statement(json.dumps(statement).encode())


def test_chunk_digest_count_is_bound_to_the_size() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    shard = ShardEntry("big.bin", "0" * 64, 10, "alice", "train", None, ("1" * 64,) * 2)
    with pytest.raises(MalformedError, match="chunk digests"):
        parse_statement(statement_bytes(Manifest("digits", 1, now, now, (shard,), chunk_size=4)))


def test_single_pub_is_a_one_of_one_policy_and_bad_policies_are_bad_input(key_pairs, tmp_path: Path) -> None:
    policy = load_trust(key_pairs.pub("alice"))
    (key_set,) = policy.key_sets
    assert (key_set.keyids, key_set.threshold, key_set.roles) == ((key_pairs.alice.keyid,), 1, ("train",))
    bad = {
        "threshold-too-high.json": {"threshold": 3, "keys": [str(key_pairs.pub("alice"))]},
        "duplicate.json": {"threshold": 1, "keys": [str(key_pairs.pub("alice"))] * 2},
        "pinned-wrong.json": {"keys": [{"path": str(key_pairs.pub("alice")), "keyid": "0" * 64}]},
        "no-keys.json": {"threshold": 1},
    }
    for name, document in bad.items():
        (tmp_path / name).write_text(json.dumps(document))
        with pytest.raises(PolicyError) as caught:
            load_trust(tmp_path / name)
        assert caught.value.exit_code == 2, name
    (tmp_path / "policy.yaml").write_text(f"threshold: 1\nkeys:\n  - {key_pairs.pub('bob')}\n")
    assert load_trust(tmp_path / "policy.yaml").keyids == (key_pairs.bob.keyid,)


def test_corrupt_state_file_is_never_reset_silently(tmp_path: Path) -> None:
    from trainguard.provenance import RollbackState

    path = tmp_path / "state.json"
    path.write_text("{not json")
    with pytest.raises(MalformedError, match="never reset silently"):
        RollbackState(path).check("digits", 1, "0" * 64)
    assert path.read_text() == "{not json"


@pytest.mark.parametrize(
    "spoil",
    [
        lambda text: text.replace('{"_type"', '{"_type":"x","_type"', 1),
        lambda text: "\ufeff" + text,
        lambda text: text.replace('"version":', '"version":NaN,"v":', 1),
        lambda text: text.replace('"version":', '"version":1e400,"v":', 1),
    ],
    ids=["duplicate-key", "bom", "nan", "overflow"],
)
def test_ambiguous_statement_json_is_malformed(spoil: object) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    manifest = Manifest("digits", 1, now, now + timedelta(days=1), (ShardEntry("a", "0" * 64, 1, "s", "train"),))
    text = statement_bytes(manifest).decode()
    assert parse_statement(text.encode()) == manifest
    with pytest.raises(MalformedError, match="strict JSON"):
        parse_statement(spoil(text).encode())  # type: ignore[operator]
    with pytest.raises(MalformedError, match="UTF-8"):
        parse_statement(text.replace('"digits"', '"digits\xff"').encode("latin-1"))


@pytest.mark.parametrize(
    "text",
    [
        "2026-01-01 10:00:00+00:00",
        "2026-01-01T10:00+00:00",
        "2026-W01-1T10:00:00Z",
        "2026-001T10:00:00Z",
        "20260101T100000Z",
        "2026-01-01T10:00:00",
        "2026-01-01T10:00:00+0000",
        "2026-02-30T10:00:00Z",
        "2026-01-01T24:00:00Z",
        "2026-01-01T10:00:00+24:00",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59-14:00",
        "\u0662\u0660\u0662\u0666-01-01T10:00:00Z",
    ],
)
def test_only_rfc3339_times_parse_and_extreme_ones_are_malformed(text: str) -> None:
    from trainguard.provenance.manifest import parse_rfc3339

    with pytest.raises(MalformedError, match="RFC 3339"):
        parse_rfc3339(text)


def test_rfc3339_times_with_fractions_and_offsets_parse_to_utc() -> None:
    from trainguard.provenance.manifest import parse_rfc3339, rfc3339

    assert parse_rfc3339("2026-01-01T10:00:00.123456789+02:30") == datetime(2026, 1, 1, 7, 30, 0, 123456, UTC)
    assert parse_rfc3339("2026-01-01t10:00:00z") == datetime(2026, 1, 1, 10, tzinfo=UTC)
    early = datetime(1, 1, 1, tzinfo=UTC)
    assert parse_rfc3339(rfc3339(early)) == early


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789-+:.TZ tzW", max_size=32))
def test_time_parsing_raises_only_malformed(text: str) -> None:
    from trainguard.provenance.manifest import parse_rfc3339

    try:
        moment = parse_rfc3339(text)
    except MalformedError:
        return
    assert moment.tzinfo is UTC


@pytest.mark.parametrize("char", ["\n", "\r", "\x1b", "\x7f", "\x85", "\x9b", "\u2028", "\u2029", "\udcff"])
def test_names_with_control_characters_or_non_utf8_bytes_are_unsafe(char: str) -> None:
    assert name_problem(f"alice/shard{char}.parquet") is not None


def test_signing_records_the_sample_count_of_every_known_format(tmp_path: Path, key_pairs) -> None:
    import io
    import tarfile

    import numpy as np

    from trainguard.provenance import sign_dataset

    root = tmp_path / "data"
    root.mkdir()
    np.savez(root / "a.npz", inputs=np.zeros((7, 1, 4, 4), np.float32), targets=np.zeros(7, np.int64))
    (root / "b.csv").write_text('x,label\n"1\n2",0\n3,1\n')
    with tarfile.open(root / "c.tar", "w") as tar:
        for key in ("000001", "000002", "sub/000001"):
            for extension in ("png", "cls"):
                info = tarfile.TarInfo(f"{key}.{extension}")
                tar.addfile(info, io.BytesIO(b""))
    envelope, _ = sign_dataset(root, key_pairs.alice, source="alice")
    records = {shard.name: shard.records for shard in parse_statement(envelope.payload).shards}
    assert records == {"a.npz": 7, "b.csv": 2, "c.tar": 3}


@pytest.mark.parametrize("blake3", ["A" * 64, "0" * 63, 7])
def test_a_blake3_digest_that_is_not_64_lowercase_hex_characters_is_refused(blake3: object) -> None:
    statement = to_statement(Manifest("d", 1, datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC), ()))
    statement["subject"] = [{"name": "a.bin", "digest": {"sha256": "0" * 64, "blake3": blake3}}]
    statement["predicate"]["shards"] = [{"name": "a.bin", "size": 1, "source": "alice", "role": "train"}]
    with pytest.raises(MalformedError, match="blake3 digest"):
        parse_statement(json.dumps(statement).encode())
