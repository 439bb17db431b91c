"""Hardened file I/O shared by every package: atomic writes that never follow a planted link, and reads of small
control files (manifests, policies, keys, state, configs) that accept only regular files of bounded size.

Errors are `OSError`s whose `strerror` says what was wrong, so each package maps them onto its own error type.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

CONTROL_FILE_LIMIT = 64 * 1024 * 1024
"""The largest manifest, policy, key, state or config file read by default; a caller whose format needs more
passes its own `limit`."""


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Writes `data` so that a crash leaves the old file or the new one, never a torn one.

    The temporary file is created with O_EXCL under an unpredictable name in the target's folder, fsynced, and
    renamed over `path`: a symbolic link planted at either name is replaced, never followed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fchmod(stream.fileno(), mode)
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_regular(path: Path, *, limit: int = CONTROL_FILE_LIMIT, follow_symlinks: bool = True) -> bytes:
    """The bytes of a regular file of at most `limit` bytes.

    Opened non-blocking (a FIFO never hangs the reader), checked with fstat on the open descriptor (a device such
    as /dev/zero is refused before reading) and read to at most `limit + 1` bytes (a file that grows is refused).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        if error.errno == errno.ELOOP and not follow_symlinks:
            raise OSError(errno.ELOOP, "is a symbolic link, refused", str(path)) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than the {limit}-byte limit", str(path))
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise OSError(errno.EFBIG, f"larger than the {limit}-byte limit", str(path))
        return b"".join(chunks)
    finally:
        os.close(fd)


def append_line(path: Path, line: bytes) -> None:
    """Appends `line` and a newline to an existing regular file and fsyncs it (a log's next record).

    The file is opened without following a link and checked to be a regular file; one write call carries the whole
    line, so a crash leaves at most a torn last line, which readers of such logs drop.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        data = line + b"\n"
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(errno.EIO, f"short write ({written} of {len(data)} bytes)", str(path))
        os.fsync(fd)
    finally:
        os.close(fd)
