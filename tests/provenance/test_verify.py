"""Each attack on a signed dataset is refused with its own reason; untouched data passes."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from trainguard.provenance import (
    PAYLOAD_TYPE,
    Envelope,
    Manifest,
    ShardEntry,
    add_signature,
    sign_envelope,
    verify_dataset,
    write_manifest,
)
from trainguard.provenance.errors import MalformedError
from trainguard.provenance.manifest import statement_bytes, to_statement
from trainguard.provenance.verify import read_envelope

if TYPE_CHECKING:
    from conftest import Keys


@pytest.fixture
def sign(signer: Any) -> Any:
    return signer


def reasons(report) -> dict[str | None, str]:
    return {f.shard: f.reason for f in report.failures}


def test_untouched_data_passes(manifest: Path, key_pairs: Keys) -> None:
    report = verify_dataset(manifest, key_pairs.trust("alice"))
    assert report.ok, report.failures
    assert report.shards == 5
    assert report.signers == (key_pairs.alice.keyid,)
    assert report.bytes_checked == sum(p.stat().st_size for p in manifest.parent.rglob("*") if p.is_file()) - (
        manifest.stat().st_size
    )


def test_bit_flip_is_a_digest_mismatch(manifest: Path, key_pairs: Keys) -> None:
    shard = manifest.parent / "raw.bin"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0x01
    shard.write_bytes(bytes(data))
    assert reasons(verify_dataset(manifest, key_pairs.trust("alice"))) == {"raw.bin": "digest-mismatch"}


def test_truncated_shard_is_refused(manifest: Path, key_pairs: Keys) -> None:
    shard = manifest.parent / "alice" / "shard-01.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert reasons(verify_dataset(manifest, key_pairs.trust("alice"))) == {"alice/shard-01.parquet": "truncated"}


def test_appended_bytes_are_refused(manifest: Path, key_pairs: Keys) -> None:
    with (manifest.parent / "bob" / "shard-00.parquet").open("ab") as stream:
        stream.write(b"\x00")
    assert reasons(verify_dataset(manifest, key_pairs.trust("alice"))) == {"bob/shard-00.parquet": "appended"}


def test_removed_shard_is_missing(manifest: Path, key_pairs: Keys) -> None:
    (manifest.parent / "holdout.parquet").unlink()
    assert reasons(verify_dataset(manifest, key_pairs.trust("alice"))) == {"holdout.parquet": "missing"}


def test_extra_unlisted_file_is_refused_unless_allowed(manifest: Path, key_pairs: Keys) -> None:
    (manifest.parent / "bob" / "new.parquet").write_bytes(b"unsigned")
    assert reasons(verify_dataset(manifest, key_pairs.trust("alice"))) == {"bob/new.parquet": "unlisted"}
    assert verify_dataset(manifest, key_pairs.trust("alice"), allow_extra=True).ok


def test_two_swapped_shards_are_refused(manifest: Path, key_pairs: Keys) -> None:
    a, b = manifest.parent / "alice" / "shard-00.parquet", manifest.parent / "bob" / "shard-00.parquet"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    report = verify_dataset(manifest, key_pairs.trust("alice"))
    assert reasons(report) == {"alice/shard-00.parquet": "swapped", "bob/shard-00.parquet": "swapped"}
    assert "bob/shard-00.parquet" in report.failures[0].detail


def test_manifest_edited_without_resigning_is_a_bad_signature(manifest: Path, key_pairs: Keys) -> None:
    document = json.loads(manifest.read_bytes())
    payload = json.loads(read_envelope(manifest)[1].payload)
    payload["predicate"]["shards"][0]["source"] = "mallory"
    import base64

    document["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    manifest.write_text(json.dumps(document))
    assert reasons(verify_dataset(manifest, key_pairs.trust("alice"))) == {None: "bad-signature"}


def test_manifest_resigned_by_untrusted_key_is_refused(sign: Any, data_dir: Path, key_pairs: Keys) -> None:
    manifest = sign(data_dir, key_pairs.carol, data_dir / "manifest.json")
    assert reasons(verify_dataset(manifest, key_pairs.trust("alice"))) == {None: "untrusted-signer"}


def _policy(key_pairs: Keys, threshold: int) -> Path:
    path = key_pairs.folder / f"policy-{threshold}.json"
    keys = ["alice.pub", "bob.pub", {"path": "carol.pub"}]
    path.write_text(json.dumps({"threshold": threshold, "keys": keys, "roles": ["train", "trusted", "holdout"]}))
    return path


def test_below_threshold_signatures_are_refused_until_cosigned(manifest: Path, key_pairs: Keys) -> None:
    from trainguard.provenance import cosign_manifest

    policy = _policy(key_pairs, 2)
    assert reasons(verify_dataset(manifest, policy)) == {None: "below-threshold"}
    cosign_manifest(manifest, key_pairs.bob)
    report = verify_dataset(manifest, policy)
    assert report.ok
    assert set(report.signers) == {key_pairs.alice.keyid, key_pairs.bob.keyid}


def test_changed_payload_type_is_refused(manifest: Path, key_pairs: Keys) -> None:
    _, envelope = read_envelope(manifest)
    write_manifest(Envelope("application/json", envelope.payload, envelope.signatures), manifest)
    assert reasons(verify_dataset(manifest, key_pairs.trust("alice"))) == {None: "payload-type"}
    resigned = sign_envelope("application/json", envelope.payload, key_pairs.alice)
    write_manifest(resigned, manifest)
    assert reasons(verify_dataset(manifest, key_pairs.trust("alice"))) == {None: "payload-type"}


def test_rollback_to_older_version_is_refused(sign: Any, data_dir: Path, key_pairs: Keys, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    old = sign(data_dir, key_pairs.alice, tmp_path / "v1.json", version=1, exclude=())
    new = sign(data_dir, key_pairs.alice, tmp_path / "v2.json", version=2, exclude=())
    assert verify_dataset(old, key_pairs.trust("alice"), data_dir=data_dir, state=state).ok
    assert verify_dataset(new, key_pairs.trust("alice"), data_dir=data_dir, state=state).ok
    report = verify_dataset(old, key_pairs.trust("alice"), data_dir=data_dir, state=state)
    assert reasons(report) == {None: "rollback"}
    assert "older than accepted version 2" in report.failures[0].detail


def test_reused_version_with_other_content_is_refused(
    sign: Any, data_dir: Path, key_pairs: Keys, tmp_path: Path
) -> None:
    state = tmp_path / "state.json"
    first = sign(data_dir, key_pairs.alice, tmp_path / "a.json", version=3, exclude=())
    assert verify_dataset(first, key_pairs.trust("alice"), data_dir=data_dir, state=state).ok
    (data_dir / "raw.bin").write_bytes(b"other data")
    second = sign(data_dir, key_pairs.alice, tmp_path / "b.json", version=3, exclude=())
    assert reasons(verify_dataset(second, key_pairs.trust("alice"), data_dir=data_dir, state=state)) == {
        None: "rollback"
    }


def test_default_state_lives_under_trainguard_home(manifest: Path, key_pairs: Keys) -> None:
    report = verify_dataset(manifest, key_pairs.trust("alice"))
    assert report.ok
    state = Path(os.environ["TRAINGUARD_HOME"]) / "provenance-state.json"
    assert report.rollback_key == "alice/digits"
    recorded = json.loads(state.read_text())["accepted"][report.rollback_key]
    assert recorded["version"] == 1 and recorded["keyids"] == [key_pairs.alice.keyid]


def test_a_manifest_of_another_dataset_is_refused_before_rollback(
    sign: Any, data_dir: Path, key_pairs: Keys, tmp_path: Path
) -> None:
    state = tmp_path / "state.json"
    other = sign(data_dir, key_pairs.alice, tmp_path / "other.json", dataset="digits-holdout", version=1)
    report = verify_dataset(other, key_pairs.trust("alice"), dataset="digits", data_dir=data_dir, state=state)
    assert reasons(report) == {None: "wrong-dataset"}
    assert "'digits-holdout', expected 'digits'" in report.failures[0].detail
    assert not state.exists(), "a refused manifest never touches the rollback state"


def test_another_key_set_signing_the_same_dataset_cannot_lock_this_one_out(
    sign: Any, data_dir: Path, key_pairs: Keys, tmp_path: Path
) -> None:
    state = tmp_path / "state.json"
    both = tmp_path / "both.json"
    both.write_text(
        json.dumps(
            {
                "signers": [
                    {"keys": [str(key_pairs.pub("alice"))], "roles": ["train", "holdout"]},
                    {"keys": [str(key_pairs.pub("bob"))], "roles": ["train", "holdout"]},
                ]
            }
        )
    )
    high = sign(data_dir, key_pairs.bob, tmp_path / "bob.json", version=99)
    assert verify_dataset(high, both, data_dir=data_dir, state=state).ok
    real = sign(data_dir, key_pairs.alice, tmp_path / "alice.json", version=1)
    assert verify_dataset(real, both, data_dir=data_dir, state=state).ok
    assert len(json.loads(state.read_text())["accepted"]) == 2


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"datasets": {"digits": {"version": 1, "statement_sha256": "ab" * 32}}}, "schema-2"),
        ('{"schema": 2, "accepted": {"%s/digits": {"version": 1e400, "statement_sha256": "%s"}}}', "overflows"),
        ({"schema": 2, "accepted": {"digits": {"version": 1, "statement_sha256": "ab" * 32}}}, "corrupt"),
    ],
)
def test_a_corrupt_or_old_rollback_state_is_refused_never_reset(
    document: object, problem: str, manifest: Path, key_pairs: Keys, tmp_path: Path
) -> None:
    state = tmp_path / "state.json"
    text = document % ("ab" * 32, "cd" * 32) if isinstance(document, str) else json.dumps(document)
    state.write_text(text)
    with pytest.raises(MalformedError, match=problem):
        verify_dataset(manifest, key_pairs.trust("alice"), state=state)
    assert state.read_text() == text


def test_expired_manifest_is_refused(sign: Any, data_dir: Path, key_pairs: Keys) -> None:
    manifest = sign(data_dir, key_pairs.alice, data_dir / "manifest.json", expires="1h")
    assert verify_dataset(manifest, key_pairs.trust("alice")).ok
    later = datetime.now(UTC) + timedelta(hours=2)
    assert reasons(verify_dataset(manifest, key_pairs.trust("alice"), now=later)) == {None: "expired"}


def _crafted(data_dir: Path, key_pairs: Keys, names: list[str]) -> Path:
    """A manifest a trusted key signed over hostile subject names (pointing at real bytes)."""
    data = (data_dir / "raw.bin").read_bytes()
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    now = datetime.now(UTC).replace(microsecond=0)
    shards = tuple(ShardEntry(n, digest, len(data), "alice", "train") for n in names)
    manifest = Manifest("digits", 1, now, now + timedelta(days=1), shards)
    envelope = sign_envelope(PAYLOAD_TYPE, statement_bytes(manifest), key_pairs.alice)
    return write_manifest(envelope, data_dir.parent / "crafted.json")


def test_dotdot_absolute_and_duplicate_names_are_refused(data_dir: Path, key_pairs: Keys) -> None:
    names = ["../data/raw.bin", "/etc/hostname", "raw.bin", "raw.bin", "./raw.bin", "alice//shard-00.parquet"]
    report = verify_dataset(
        _crafted(data_dir, key_pairs, names), key_pairs.trust("alice"), data_dir=data_dir, allow_extra=True
    )
    assert reasons(report) == {
        "../data/raw.bin": "unsafe-path",
        "/etc/hostname": "unsafe-path",
        "raw.bin": "duplicate-name",
        "./raw.bin": "unsafe-path",
        "alice//shard-00.parquet": "unsafe-path",
    }


def test_shard_replaced_by_symlink_is_refused(manifest: Path, key_pairs: Keys, tmp_path: Path) -> None:
    shard = manifest.parent / "raw.bin"
    outside = tmp_path / "outside.bin"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    assert reasons(verify_dataset(manifest, key_pairs.trust("alice"))) == {"raw.bin": "symlink"}


def test_folder_replaced_by_symlink_is_refused(manifest: Path, key_pairs: Keys, tmp_path: Path) -> None:
    folder = manifest.parent / "bob"
    folder.rename(tmp_path / "bob-elsewhere")
    folder.symlink_to(tmp_path / "bob-elsewhere")
    report = verify_dataset(manifest, key_pairs.trust("alice"))
    assert reasons(report) == {"bob/shard-00.parquet": "symlink", "bob": "unlisted"}


def test_fifo_in_place_of_a_shard_is_not_regular(manifest: Path, key_pairs: Keys) -> None:
    shard = manifest.parent / "raw.bin"
    shard.unlink()
    os.mkfifo(shard)
    assert reasons(verify_dataset(manifest, key_pairs.trust("alice"))) == {"raw.bin": "not-regular"}


def test_every_failing_shard_is_listed(manifest: Path, key_pairs: Keys) -> None:
    root = manifest.parent
    (root / "raw.bin").write_bytes(b"x" * 3000)
    (root / "holdout.parquet").unlink()
    (root / "extra.txt").write_text("?")
    assert reasons(verify_dataset(manifest, key_pairs.trust("alice"))) == {
        "raw.bin": "digest-mismatch",
        "holdout.parquet": "missing",
        "extra.txt": "unlisted",
    }


def test_cosigned_manifest_keeps_both_signatures(manifest: Path, key_pairs: Keys) -> None:
    _, envelope = read_envelope(manifest)
    write_manifest(add_signature(envelope, key_pairs.carol), manifest)
    assert len(read_envelope(manifest)[1].signatures) == 2
    assert verify_dataset(manifest, key_pairs.trust("carol")).ok


def test_signing_refuses_symlinks_in_the_data_dir(sign: Any, data_dir: Path, key_pairs: Keys, tmp_path: Path) -> None:
    from trainguard.provenance import DataDirError

    (data_dir / "link").symlink_to(tmp_path)
    with pytest.raises(DataDirError, match="symlink"):
        sign(data_dir, key_pairs.alice, tmp_path / "m.json")


def test_raising_api_carries_the_first_failure_and_the_whole_report(manifest: Path, key_pairs: Keys) -> None:
    from trainguard.provenance import VerificationFailed, verify_or_raise

    assert verify_or_raise(manifest, key_pairs.trust("alice")).ok
    (manifest.parent / "raw.bin").write_bytes(b"?" * 3000)
    with pytest.raises(VerificationFailed) as caught:
        verify_or_raise(manifest, key_pairs.trust("alice"))
    assert (caught.value.reason, caught.value.shard, caught.value.exit_code) == ("digest-mismatch", "raw.bin", 1)
    assert not caught.value.report.ok


def test_chunk_signed_shards_verify_chunk_by_chunk(sign: Any, data_dir: Path, key_pairs: Keys) -> None:
    manifest = sign(data_dir, key_pairs.alice, data_dir / "manifest.json", chunk_size=1024)
    report = verify_dataset(manifest, key_pairs.trust("alice"))
    assert report.ok, report.failures
    assert report.bytes_checked == sum(p.stat().st_size for p in data_dir.rglob("*.*") if p != manifest)

    shard = data_dir / "raw.bin"
    data = bytearray(shard.read_bytes())
    data[2100] ^= 0x01
    shard.write_bytes(bytes(data))
    failure = verify_dataset(manifest, key_pairs.trust("alice")).failures[0]
    assert (failure.shard, failure.reason) == ("raw.bin", "digest-mismatch")
    assert failure.detail.startswith("chunk 2 sha256 ")


def test_swapped_chunk_signed_shards_of_one_size_are_refused(sign: Any, data_dir: Path, key_pairs: Keys) -> None:
    first, second = data_dir / "raw-a.bin", data_dir / "raw-b.bin"
    first.write_bytes(os.urandom(5000))
    second.write_bytes(os.urandom(5000))
    manifest = sign(data_dir, key_pairs.alice, data_dir / "manifest.json", chunk_size=1024)
    data = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(data)
    report = verify_dataset(manifest, key_pairs.trust("alice"))
    assert reasons(report) == {"raw-a.bin": "swapped", "raw-b.bin": "swapped"}


def test_two_large_shards_are_hashed_on_two_threads_at_once(tmp_path: Path, key_pairs: Keys) -> None:
    import threading

    from trainguard.provenance import sign_dataset

    root = tmp_path / "data"
    root.mkdir()
    for name in ("huge-a.bin", "huge-b.bin"):
        (root / name).write_bytes(os.urandom(3 * 1024 * 1024))
    envelope, _ = sign_dataset(root, key_pairs.alice, source="a", chunk_size=1024 * 1024)
    manifest = write_manifest(envelope, tmp_path / "m.json")
    both_hashing = threading.Barrier(2, timeout=30)
    threads: set[str] = set()

    def on_bytes(count: int) -> None:
        if threading.current_thread().name not in threads:  # each thread's first span waits for the other's
            threads.add(threading.current_thread().name)
            both_hashing.wait()

    report = verify_dataset(manifest, key_pairs.trust("alice"), data_dir=root, workers=2, on_bytes=on_bytes)
    assert report.ok and len(threads) == 2


def test_chunk_digests_of_other_bytes_than_the_subject_digest_are_refused(
    sign: Any, data_dir: Path, key_pairs: Keys, resign: Any
) -> None:
    import hashlib
    from dataclasses import replace

    manifest = sign(data_dir, key_pairs.alice, data_dir / "manifest.json", chunk_size=1024)
    other = os.urandom(3000)
    chunks = tuple(hashlib.sha256(other[i : i + 1024]).hexdigest() for i in range(0, 3000, 1024))
    resign(manifest, key_pairs.alice, lambda s: replace(s, chunks=chunks) if s.name == "raw.bin" else s)
    (data_dir / "raw.bin").write_bytes(other)  # the bytes the chunk digests describe, not the subject digest
    failure = verify_dataset(manifest, key_pairs.trust("alice")).failures[0]
    assert (failure.shard, failure.reason) == ("raw.bin", "digest-mismatch")
    assert failure.detail.startswith("whole-file blake3 ")


def test_a_subject_digest_with_chunk_digests_of_other_bytes_is_refused(
    sign: Any, data_dir: Path, key_pairs: Keys, resign: Any
) -> None:
    from dataclasses import replace

    manifest = sign(data_dir, key_pairs.alice, data_dir / "manifest.json", chunk_size=1024)
    resign(
        manifest,
        key_pairs.alice,
        lambda s: replace(s, chunks=(s.chunks[0], "0" * 64, *s.chunks[2:])) if s.chunks else s,
    )
    report = verify_dataset(manifest, key_pairs.trust("alice"))
    assert {f.reason for f in report.failures} == {"digest-mismatch"}
    assert all(f.detail.startswith("chunk 1 sha256 ") for f in report.failures)


def test_a_fifo_manifest_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "manifest.json"
    os.mkfifo(fifo)
    with pytest.raises(MalformedError, match="not a regular file") as caught:
        read_envelope(fifo)
    assert caught.value.exit_code == 2


def test_a_device_as_manifest_is_refused_before_reading() -> None:
    with pytest.raises(MalformedError, match=r"/dev/zero.*not a regular file"):
        read_envelope(Path("/dev/zero"))


def test_writing_a_manifest_never_follows_a_planted_symlink(manifest: Path, key_pairs: Keys, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    envelope = read_envelope(manifest)[1]
    out = tmp_path / "out" / "m.json"
    out.parent.mkdir()
    for planted in (out, out.with_name(f".{out.name}.{os.getpid()}.tmp"), out.with_name(f".{out.name}.tmp")):
        planted.symlink_to(victim)
    write_manifest(envelope, out)
    assert victim.read_bytes() == b"precious"
    assert not out.is_symlink() and read_envelope(out)[1] == envelope


def test_non_utf8_and_control_character_names_in_the_data_dir_are_reported_on_one_line(
    manifest: Path, key_pairs: Keys
) -> None:
    root = os.fsencode(manifest.parent)
    for raw in (b"bad\xff.bin", b"two\nFAIL forged: ok.bin", b"esc\x1b[2J.bin"):
        with open(os.path.join(root, raw), "wb") as stream:
            stream.write(b"x")
    report = verify_dataset(manifest, key_pairs.trust("alice"))
    assert {f.reason for f in report.failures} == {"unlisted"}
    lines = [f.line() for f in report.failures]
    assert len(lines) == 3 and all("\n" not in line and "\x1b" not in line for line in lines)
    assert "bad\\udcff.bin: unlisted" in "\n".join(lines) and "two\\nFAIL forged" in "\n".join(lines)
    json.dumps(report.to_dict())  # the machine-readable report survives such names too


@pytest.mark.parametrize("raw", [b"bad\xff.bin", b"new\nline.bin", b"c1\xc2\x85.bin", b"sep\xe2\x80\xa8.bin"])
def test_signing_refuses_control_character_and_non_utf8_names(
    sign: Any, data_dir: Path, key_pairs: Keys, raw: bytes
) -> None:
    from trainguard.provenance import DataDirError

    with open(os.path.join(os.fsencode(data_dir), raw), "wb") as stream:
        stream.write(b"x")
    with pytest.raises(DataDirError, match="unsafe shard name") as caught:
        sign(data_dir, key_pairs.alice, data_dir.parent / "m.json")
    message = str(caught.value)
    assert "\n" not in message and message.isprintable() and caught.value.exit_code == 2


def test_signed_subject_names_with_control_characters_are_unsafe_paths(data_dir: Path, key_pairs: Keys) -> None:
    names = ["raw.bin\nFAIL x", "a\u2028b", "a\udcffb"]  # JSON's \udcff escape decodes to a lone surrogate
    now = datetime.now(UTC).replace(microsecond=0)
    shards = tuple(ShardEntry(n, "0" * 64, 1, "alice", "train") for n in names)
    payload = json.dumps(to_statement(Manifest("digits", 1, now, now + timedelta(days=1), shards))).encode()
    crafted = write_manifest(sign_envelope(PAYLOAD_TYPE, payload, key_pairs.alice), data_dir.parent / "crafted.json")
    report = verify_dataset(crafted, key_pairs.pub("alice"), data_dir=data_dir, allow_extra=True)
    assert reasons(report) == dict.fromkeys(names, "unsafe-path")
    assert all(f.line().isprintable() for f in report.failures)


def test_with_allow_extra_a_shard_under_a_symlinked_folder_or_replaced_by_a_fifo_is_still_refused(
    tmp_path: Path, key_pairs: Keys
) -> None:
    from trainguard.provenance.signing import build_manifest, write_signed

    data = tmp_path / "data"
    for name in ("a/one.bin", "b/two.bin", "three.bin"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(name.encode())
    path = write_signed(build_manifest(data, source="a"), key_pairs.alice, tmp_path / "m.json", layout="single")
    (data / "a").rename(tmp_path / "elsewhere")
    (data / "a").symlink_to(tmp_path / "elsewhere")
    (data / "three.bin").unlink()
    os.mkfifo(data / "three.bin")
    (data / "extra.bin").write_bytes(b"allowed")
    report = verify_dataset(path, key_pairs.trust("alice"), data_dir=data, state=tmp_path / "s.json", allow_extra=True)
    assert sorted((f.shard, f.reason) for f in report.failures) == [
        ("a/one.bin", "symlink"),
        ("three.bin", "not-regular"),
    ]


def test_every_shard_is_signed_with_the_sha256_and_blake3_of_its_bytes(manifest: Path) -> None:
    import hashlib

    import blake3

    from trainguard.provenance.manifest import parse_statement

    for shard in parse_statement(read_envelope(manifest)[1].payload).shards:
        data = (manifest.parent / shard.name).read_bytes()
        assert (shard.sha256, shard.blake3) == (hashlib.sha256(data).hexdigest(), blake3.blake3(data).hexdigest())


def test_verify_checks_the_signed_blake3_so_bytes_it_does_not_describe_are_refused(
    manifest: Path, key_pairs: Keys, resign: Any
) -> None:
    from dataclasses import replace

    resign(manifest, key_pairs.alice, lambda s: replace(s, blake3="0" * 64) if s.name == "raw.bin" else s)
    failure = verify_dataset(manifest, key_pairs.trust("alice")).failures[0]
    assert (failure.shard, failure.reason) == ("raw.bin", "digest-mismatch")
    assert failure.detail.startswith("whole-file blake3 ")


def test_a_manifest_signed_without_blake3_is_verified_by_sha256(manifest: Path, key_pairs: Keys, resign: Any) -> None:
    from dataclasses import replace

    resign(manifest, key_pairs.alice, lambda s: replace(s, blake3=None))
    assert verify_dataset(manifest, key_pairs.trust("alice")).ok
    shard = manifest.parent / "raw.bin"
    shard.write_bytes(b"\x00" + shard.read_bytes()[1:])
    failure = verify_dataset(manifest, key_pairs.trust("alice")).failures[0]
    assert (failure.shard, failure.reason) == ("raw.bin", "digest-mismatch")
    assert failure.detail.startswith("whole-file sha256 ")
