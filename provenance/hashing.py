"""Streaming SHA-256 of shard files: large reads into one reused buffer (constant memory), files hashed in threads.

hashlib releases the GIL on large updates, so threads use every core.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from provenance.errors import ShardError

BLOCK_SIZE = 4 * 1024 * 1024
ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    size: int
    chunks: tuple[str, ...] = ()
    md5: str | None = None


def open_regular(path: Path, name: str) -> int:
    """A read-only descriptor of a regular file, refusing a symlink as the last component (no TOCTOU on it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ShardError(f"shard {name}: is a symbolic link", shard=name, reason="symlink") from None
        if error.errno == errno.ENOENT:
            raise ShardError(f"shard {name}: does not exist", shard=name, reason="missing") from None
        raise ShardError(f"shard {name}: cannot open: {error.strerror}", shard=name, reason="unreadable") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ShardError(f"shard {name}: is not a regular file", shard=name, reason="not-regular")
    return fd


def digest_file(
    path: Path,
    name: str,
    *,
    chunk_size: int | None = None,
    md5: bool = False,
    on_bytes: ProgressCallback | None = None,
) -> FileDigest:
    """SHA-256 of the whole file, plus per-chunk SHA-256 when `chunk_size` is given and md5 when asked (DVC)."""
    fd = open_regular(path, name)
    block = min(BLOCK_SIZE, chunk_size) if chunk_size else BLOCK_SIZE
    buffer = bytearray(block)
    view = memoryview(buffer)
    whole = hashlib.sha256()
    weak = hashlib.md5(usedforsecurity=False) if md5 else None
    chunk = hashlib.sha256() if chunk_size else None
    chunks: list[str] = []
    in_chunk = size = 0
    try:
        with os.fdopen(fd, "rb", buffering=0) as stream:
            while True:
                want = min(block, chunk_size - in_chunk) if chunk_size else block
                count = stream.readinto(view[:want])
                if not count:
                    break
                data = view[:count]
                whole.update(data)
                if weak is not None:
                    weak.update(data)
                if chunk is not None:
                    chunk.update(data)
                    in_chunk += count
                    if in_chunk == chunk_size:
                        chunks.append(chunk.hexdigest())
                        chunk, in_chunk = hashlib.sha256(), 0
                size += count
                if on_bytes is not None:
                    on_bytes(count)
    except OSError as error:
        raise ShardError(f"shard {name}: read failed: {error.strerror}", shard=name, reason="unreadable") from None
    if chunk is not None and in_chunk:
        chunks.append(chunk.hexdigest())
    return FileDigest(whole.hexdigest(), size, tuple(chunks), weak.hexdigest() if weak else None)


def digest_files(
    files: Mapping[str, Path],
    *,
    workers: int | None = None,
    chunk_size: int | None = None,
    md5: bool = False,
    on_bytes: ProgressCallback | None = None,
) -> dict[str, FileDigest | ShardError]:
    """Digests of many files in parallel threads (largest first, for balance); a failing file yields its error."""

    def one(name: str) -> FileDigest | ShardError:
        try:
            return digest_file(files[name], name, chunk_size=chunk_size, md5=md5, on_bytes=on_bytes)
        except ShardError as error:
            return error

    def size_of(name: str) -> int:
        try:
            return os.lstat(files[name]).st_size
        except OSError:
            return 0

    order = sorted(files, key=size_of, reverse=True)
    workers = max(1, min(workers or os.cpu_count() or 1, len(order) or 1))
    if workers == 1:
        return {name: one(name) for name in order}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="trainguard-hash") as pool:
        return dict(zip(order, pool.map(one, order), strict=True))
