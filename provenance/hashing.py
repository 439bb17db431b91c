"""SHA-256 (and BLAKE3) of shard files in threads: small files read whole (one open, fstat and read each) in batches
per thread task, large ones streamed as memory-mapped windows (constant memory, no copy), their whole digests and
chunk digests from the same single pass.

Signing records both whole-file digests; verification checks one, BLAKE3 where the manifest has it (2-3x faster
than SHA-256 here, and a 256-bit cryptographic hash as strong for this use), SHA-256 otherwise.

hashlib releases the GIL on large updates, so threads use every core. Like git and b3sum, hashing reads mapped
pages: a file truncated by another process *while* it is hashed kills the process with SIGBUS (exit 135), which
fails closed. Training never parses mapped bytes: `reader.ShardReader` copies a shard into private memory first.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import blake3

from trainguard.provenance.errors import (
    MissingShardError,
    NotRegularShardError,
    ShardError,
    SymlinkShardError,
    TruncatedShardError,
    UnreadableShardError,
)

WINDOW = 16 * 1024 * 1024
SMALL_FILE = 4 * 1024 * 1024
"""Files up to this size are read with one `read` into memory instead of being mapped."""
BATCH_BYTES = 16 * 1024 * 1024
BATCH_OVERHEAD = 64 * 1024
"""What one file costs a batch beyond its bytes (open, fstat, close, Python): a batch of empty files stays short."""
ProgressCallback = Callable[[int], None]
Whole = Literal["sha256", "blake3"]
WHOLE: dict[Whole, Callable[[], Any]] = {"sha256": hashlib.sha256, "blake3": blake3.blake3}
"""The whole-file digests a manifest may sign, by their in-toto DigestSet names."""


@dataclass(frozen=True)
class FileDigest:
    """What one pass over a file gave: the whole-file digests asked for (None: not computed), chunk digests, md5."""

    sha256: str | None
    size: int
    chunks: tuple[str, ...] = ()
    md5: str | None = None
    blake3: str | None = None


def open_regular(path: Path | str, name: str) -> int:
    """A read-only descriptor of a regular file, refusing a symlink as the last component (no TOCTOU on it);
    opened non-blocking, so a FIFO put in a shard's place never hangs the reader."""
    return _open_sized(path, name)[0]


def _open_sized(path: Path | str, name: str) -> tuple[int, int]:
    """`open_regular`'s descriptor and the file's size from the same fstat."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise SymlinkShardError(f"shard {name}: is a symbolic link", shard=name) from None
        if error.errno == errno.ENOENT:
            raise MissingShardError(f"shard {name}: does not exist", shard=name) from None
        raise UnreadableShardError(f"shard {name}: cannot open: {error.strerror}", shard=name) from None
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):
        os.close(fd)
        raise NotRegularShardError(f"shard {name}: is not a regular file", shard=name)
    return fd, status.st_size


class ChunkDigests:
    """SHA-256 of each consecutive `chunk_size`-byte chunk of a stream that arrives in spans of any length."""

    def __init__(self, chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk size must be positive, not {chunk_size}")
        self.chunk_size = chunk_size
        self._digests: list[str] = []
        self._current = hashlib.sha256()
        self._filled = 0

    def update(self, span: memoryview | bytes) -> None:
        offset = 0
        while offset < len(span):
            take = min(self.chunk_size - self._filled, len(span) - offset)
            self._current.update(span[offset : offset + take])
            offset += take
            self._filled += take
            if self._filled == self.chunk_size:
                self._digests.append(self._current.hexdigest())
                self._current, self._filled = hashlib.sha256(), 0

    def digests(self) -> tuple[str, ...]:
        """Every chunk's digest, the last (shorter) chunk included."""
        tail = (self._current.hexdigest(),) if self._filled else ()
        return (*self._digests, *tail)


def digest_file(
    path: Path,
    name: str,
    *,
    chunk_size: int | None = None,
    md5: bool = False,
    on_bytes: ProgressCallback | None = None,
    whole: tuple[Whole, ...] = ("sha256",),
) -> FileDigest:
    """The `whole`-file digests, plus per-chunk SHA-256 when `chunk_size` is given and md5 when asked (DVC)."""
    with _opened(path, name) as (fd, size):
        return _digest_open(fd, size, chunk_size=chunk_size, md5=md5, on_bytes=on_bytes, whole=whole)


def _digest_open(
    fd: int,
    size: int,
    *,
    chunk_size: int | None,
    md5: bool,
    on_bytes: ProgressCallback | None,
    whole: tuple[Whole, ...] = ("sha256",),
) -> FileDigest:
    """Digests of the first `size` bytes of an open file. A small file is read in one call (no mapping) and each
    digest made from it at once (no Python per byte range: many small files are GIL-bound); a large one is hashed
    in one pass over mapped windows, each window's chunk digests computed on a second thread while this
    one hashes the whole (hashlib releases the GIL), so both digests cost about the time of one."""
    if size <= SMALL_FILE:
        data = os.read(fd, size) if size else b""
        if len(data) != size:
            raise ValueError("short read")
        if on_bytes is not None:
            on_bytes(size)
        return FileDigest(
            hashlib.sha256(data).hexdigest() if "sha256" in whole else None,
            size,
            _chunk_digests(data, chunk_size) if chunk_size else (),
            hashlib.md5(data, usedforsecurity=False).hexdigest() if md5 else None,
            blake3.blake3(data).hexdigest() if "blake3" in whole else None,
        )
    wholes = {name: WHOLE[name]() for name in whole}
    weak = hashlib.md5(usedforsecurity=False) if md5 else None
    chunks = ChunkDigests(chunk_size) if chunk_size else None
    _digest_windows(fd, size, [*wholes.values(), *([weak] if weak else [])], chunks, on_bytes)
    return FileDigest(
        wholes["sha256"].hexdigest() if "sha256" in wholes else None,
        size,
        chunks.digests() if chunks else (),
        weak.hexdigest() if weak else None,
        wholes["blake3"].hexdigest() if "blake3" in wholes else None,
    )


def _chunk_digests(data: bytes, chunk_size: int) -> tuple[str, ...]:
    chunks = ChunkDigests(chunk_size)
    chunks.update(data)
    return chunks.digests()


def _digest_windows(
    fd: int, size: int, digests: Sequence[Any], chunks: ChunkDigests | None, on_bytes: ProgressCallback | None
) -> None:
    with ExitStack() as stack:
        side = None
        if chunks is not None:
            side = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainguard-chunks"))
        for span in _spans(fd, 0, size):
            pending = side.submit(chunks.update, span) if side is not None and chunks is not None else None
            for digest in digests:
                digest.update(span)
            if pending is not None:
                pending.result()  # the window stays mapped until both digests have read it
            if on_bytes is not None:
                on_bytes(len(span))


@contextmanager
def _opened(path: Path | str, name: str) -> Iterator[tuple[int, int]]:
    """A descriptor of the regular file `path` and its size, closed after use; read failures become the shard's
    ShardError."""
    fd, size = _open_sized(path, name)
    try:
        yield fd, size
    except (OSError, ValueError) as error:
        raise _read_failure(name, error) from None
    finally:
        os.close(fd)


def _read_failure(name: str, error: OSError | ValueError) -> ShardError:
    """A failed read as the shard's error; ValueError is a short read or a window past the end (the file shrank
    after it was opened)."""
    if isinstance(error, OSError):
        return UnreadableShardError(f"shard {name}: read failed: {error.strerror}", shard=name)
    return TruncatedShardError(f"shard {name}: truncated while it was hashed", shard=name)


def _spans(fd: int, offset: int, length: int) -> Iterator[memoryview]:
    """Bytes [offset, offset + length) as read-only views of memory-mapped windows: hashlib reads the page cache
    directly (no copy into a buffer, ~12% faster on 2 cores) and one window per thread at most is mapped (constant
    memory). Bytes appended after the caller read the size are not hashed; the verifier compares sizes itself."""
    position, end = offset, offset + length
    while position < end:
        base = position - position % mmap.ALLOCATIONGRANULARITY
        stop = min(base + WINDOW, end)
        with (
            mmap.mmap(fd, stop - base, prot=mmap.PROT_READ, offset=base) as window,
            memoryview(window) as mapped,
            mapped[position - base :] as view,
        ):
            yield view
        position = stop


@dataclass(frozen=True)
class HashJob:
    """One file to digest: its shard name, its path, the size it should have (to balance threads), its chunk
    size (None: no chunk digests) and the whole-file digests to compute."""

    name: str
    path: str
    size_hint: int
    chunk_size: int | None = None
    whole: tuple[Whole, ...] = ("sha256",)


@dataclass(frozen=True)
class FileSize:
    """A file left unhashed: its size alone decides its check."""

    size: int


HashOutcome = FileDigest | FileSize | ShardError
SizeGate = Callable[[HashJob, int], bool]


def digest_jobs(
    jobs: Sequence[HashJob],
    *,
    md5: bool = False,
    workers: int | None = None,
    on_bytes: ProgressCallback | None = None,
    hash_if: SizeGate | None = None,
) -> list[HashOutcome]:
    """Digests of many files in threads, in the order of `jobs`; a failing file yields its ShardError, a file whose
    size `hash_if` rejects yields its FileSize unhashed. Small files go in batches (one thread task per batch, one
    open + fstat + read each), large ones one per task, largest first."""
    results: list[HashOutcome | None] = [None] * len(jobs)

    def run(batch: Sequence[int]) -> None:
        for index in batch:
            results[index] = _run_job(jobs[index], md5, on_bytes, hash_if)

    batches = _batches(jobs)
    workers = max(1, min(workers or os.cpu_count() or 1, len(batches) or 1))
    if workers == 1:
        for batch in batches:
            run(batch)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="trainguard-hash") as pool:
            list(pool.map(run, batches))
    return cast(list[HashOutcome], results)


def _run_job(job: HashJob, md5: bool, on_bytes: ProgressCallback | None, hash_if: SizeGate | None) -> HashOutcome:
    """One file's outcome (`_opened` inlined: thousands of small files per thread make its cost show)."""
    try:
        fd, size = _open_sized(job.path, job.name)
    except ShardError as error:
        return error
    try:
        if hash_if is not None and not hash_if(job, size):
            return FileSize(size)
        return _digest_open(fd, size, chunk_size=job.chunk_size, md5=md5, on_bytes=on_bytes, whole=job.whole)
    except (OSError, ValueError) as error:
        return _read_failure(job.name, error)
    finally:
        os.close(fd)


def _batches(jobs: Sequence[HashJob]) -> list[list[int]]:
    """Job indices grouped for threads: large or chunk-signed files alone, largest first; small ones up to
    BATCH_BYTES a batch."""
    order = sorted(range(len(jobs)), key=lambda index: jobs[index].size_hint, reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for index in order:
        size = jobs[index].size_hint
        if size > SMALL_FILE or jobs[index].chunk_size is not None:
            batches.append([index])
            continue
        current.append(index)
        filled += size + BATCH_OVERHEAD
        if filled >= BATCH_BYTES:
            batches.append(current)
            current, filled = [], 0
    if current:
        batches.append(current)
    return batches


def digest_files(
    files: Mapping[str, Path],
    *,
    workers: int | None = None,
    chunk_size: int | None = None,
    md5: bool = False,
    on_bytes: ProgressCallback | None = None,
    sizes: Mapping[str, int] | None = None,
    whole: tuple[Whole, ...] = ("sha256",),
) -> dict[str, FileDigest | ShardError]:
    """Digests of many files in parallel threads; a failing file yields its error. `sizes` (from a directory walk)
    balance the threads; without them every file counts as small."""
    names = list(files)
    jobs = [HashJob(name, str(files[name]), (sizes or {}).get(name, 0), chunk_size, whole) for name in names]
    outcomes = digest_jobs(jobs, md5=md5, workers=workers, on_bytes=on_bytes)
    return {name: outcome for name, outcome in zip(names, outcomes, strict=True) if not isinstance(outcome, FileSize)}
