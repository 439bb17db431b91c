"""Streaming digests: whole-file, chunk and md5 digests equal hashlib's over the same bytes, whatever the spans."""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainguard.provenance.errors import ShardError
from trainguard.provenance.hashing import (
    WINDOW,
    ChunkDigests,
    FileSize,
    HashJob,
    digest_file,
    digest_files,
    digest_jobs,
)


def reference_chunks(data: bytes, chunk_size: int) -> tuple[str, ...]:
    return tuple(hashlib.sha256(data[i : i + chunk_size]).hexdigest() for i in range(0, len(data), chunk_size))


@given(st.binary(max_size=300), st.integers(1, 64), st.lists(st.integers(0, 300), max_size=8))
def test_chunk_digests_do_not_depend_on_how_the_stream_is_split(data: bytes, chunk_size: int, cuts: list[int]) -> None:
    chunks = ChunkDigests(chunk_size)
    bounds = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    for start, end in itertools.pairwise(bounds):
        chunks.update(memoryview(data)[start:end])
    assert chunks.digests() == reference_chunks(data, chunk_size)


def test_a_file_over_several_mapped_windows_hashes_like_hashlib(tmp_path: Path) -> None:
    data = os.urandom(WINDOW + 3 * 1024 * 1024 + 17)
    (tmp_path / "big.bin").write_bytes(data)
    seen: list[int] = []
    digest = digest_file(
        tmp_path / "big.bin", "big.bin", chunk_size=3 * 1024 * 1024 + 1, md5=True, on_bytes=seen.append
    )
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert digest.blake3 is None
    assert digest.md5 == hashlib.md5(data).hexdigest()
    assert digest.chunks == reference_chunks(data, 3 * 1024 * 1024 + 1)
    assert digest.size == sum(seen) == len(data)


@pytest.mark.parametrize("size", [0, 100_000, WINDOW + 5])
def test_blake3_alone_or_beside_sha256_equals_the_reference_over_the_same_bytes(tmp_path: Path, size: int) -> None:
    import blake3

    data = os.urandom(size)
    (tmp_path / "f.bin").write_bytes(data)
    both = digest_file(tmp_path / "f.bin", "f.bin", whole=("sha256", "blake3"))
    alone = digest_file(tmp_path / "f.bin", "f.bin", whole=("blake3",))
    assert (both.sha256, both.blake3) == (hashlib.sha256(data).hexdigest(), blake3.blake3(data).hexdigest())
    assert (alone.sha256, alone.blake3) == (None, both.blake3)


def test_an_empty_file_has_the_empty_digest_and_no_chunks(tmp_path: Path) -> None:
    (tmp_path / "empty.bin").write_bytes(b"")
    digest = digest_file(tmp_path / "empty.bin", "empty.bin", chunk_size=1024)
    assert (digest.sha256, digest.size, digest.chunks) == (hashlib.sha256(b"").hexdigest(), 0, ())


def test_files_hashed_in_threads_report_each_failure_by_name(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"a" * 1000)
    (tmp_path / "link.bin").symlink_to(tmp_path / "a.bin")
    results = digest_files(
        {"a.bin": tmp_path / "a.bin", "link.bin": tmp_path / "link.bin", "gone.bin": tmp_path / "gone.bin"}, workers=2
    )
    assert results["a.bin"].sha256 == hashlib.sha256(b"a" * 1000).hexdigest()
    assert isinstance(results["link.bin"], ShardError) and results["link.bin"].reason == "symlink"
    assert isinstance(results["gone.bin"], ShardError) and results["gone.bin"].reason == "missing"


def test_a_chunk_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="chunk size"):
        ChunkDigests(0)


def test_a_file_truncated_between_windows_is_refused_as_truncated(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(WINDOW + 1024))

    def truncate_after_first_window(count: int) -> None:
        os.truncate(path, 10)

    with pytest.raises(ShardError, match="truncated while it was hashed") as caught:
        digest_file(path, "big.bin", on_bytes=truncate_after_first_window)
    assert caught.value.reason == "truncated"


def test_small_files_hashed_in_batches_come_back_in_job_order(tmp_path: Path) -> None:
    contents = [os.urandom(size) for size in (0, 1, 5000, 70_000) * 20 + (5 * 1024 * 1024,)]
    jobs = []
    for index, data in enumerate(contents):
        (tmp_path / f"{index}.bin").write_bytes(data)
        jobs.append(HashJob(f"{index}.bin", str(tmp_path / f"{index}.bin"), len(data)))
    outcomes = digest_jobs(jobs, workers=2)
    assert [o.sha256 for o in outcomes] == [hashlib.sha256(data).hexdigest() for data in contents]


def test_a_file_whose_size_the_gate_refuses_is_left_unhashed_with_its_size(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"abc")
    outcomes = digest_jobs([HashJob("a.bin", str(tmp_path / "a.bin"), 10)], hash_if=lambda job, size: False)
    assert outcomes == [FileSize(3)]


def test_a_fifo_in_a_shards_place_is_refused_as_not_regular_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "a.bin")
    (outcome,) = digest_jobs([HashJob("a.bin", str(tmp_path / "a.bin"), 10)])
    assert isinstance(outcome, ShardError) and outcome.reason == "not-regular"
