"""What DVC records about a repository's data, read through DVC's own API (`dvc.repo.Repo`, `DVCFileSystem`,
`dvc.api`): the md5 of each file of a tracked data dir, the remotes, and where a tracked path's content lives in
the default remote. DVC applies its whole configuration (system, global, repository, local) and reads a listing
from the cache or, when only the remote holds it, from the remote.

md5 is never a security decision here: it is only compared beside the signed SHA-256, to catch a data dir that
drifted from what DVC tracks (or a manifest signed over different files than the ones DVC versions).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from trainguard.files import read_regular
from trainguard.provenance.errors import DataDirError, MalformedError
from trainguard.provenance.paths import name_problem, printable

_MD5 = re.compile(r"[0-9a-f]{32}")
LOCK_FILE = "dvc.lock"


@dataclass(frozen=True)
class DvcRecord:
    """What DVC records for a repository when a cycle runs in it: the `dvc.lock` the run starts from (its sha256,
    None without one), each remote's URL, and for each DVC out holding a path asked about, the URL of its content
    in the default remote (none without a default remote)."""

    root: Path
    lock_sha256: str | None
    remotes: dict[str, str]
    data: dict[Path, str]


def find_repo_root(start: Path) -> Path:
    """The DVC repository `start` is in (the nearest folder above it with a `.dvc` folder).

    Args:
        start: A path inside the repository.

    Returns:
        The repository's root folder.

    Raises:
        DataDirError: No folder at or above `start` holds `.dvc`.
    """
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    raise DataDirError(f"{start} is not inside a DVC repository (no .dvc folder above it)", path=str(start))


def dvc_tracked_md5(data_dir: Path) -> dict[str, str]:
    """Relative POSIX name -> md5 of every file DVC tracks under `data_dir`, from DVC's records (not the files).

    The md5s are only compared beside the signed digests (signing and verifying with `dvc`), never trusted alone.

    Args:
        data_dir: A folder DVC tracks as a directory, or a folder inside one (a `.dvc` file's or a stage's out).

    Returns:
        Each tracked file's path relative to `data_dir` mapped to its md5, as DVC's listing of it says.

    Raises:
        DataDirError: Not inside a DVC repository, not tracked (as a directory), DVC's files or config cannot be
            read, or neither the cache nor a remote holds the listing.
        MalformedError: The listing names a file unsafely or gives it a malformed md5.
    """
    data_dir = Path(data_dir).resolve()
    root = find_repo_root(data_dir)
    relative = data_dir.relative_to(root).as_posix()
    with _dvc_errors(root):
        from dvc.fs import DVCFileSystem

        fs = DVCFileSystem(repo=str(root))
        try:
            tracked = fs.info(relative).get("dvc_info")
        except FileNotFoundError:
            tracked = None
        if not tracked:
            raise DataDirError(f"{data_dir} is not tracked by DVC (no .dvc file nor dvc.lock out holds it)")
        if tracked.get("type") != "directory":
            how = "as a file, not as a directory" if tracked.get("md5") else "with no record yet (run `dvc repro`)"
            raise DataDirError(f"{data_dir} is tracked by DVC {how}", path=str(data_dir))
        listing = _listing(fs.walk(relative, detail=True), relative, data_dir)
    if not listing:
        raise DataDirError(f"DVC has no listing of {data_dir} in its cache or remote: run `dvc pull`")
    return listing


def _listing(walk: Iterator[Any], top: str, data_dir: Path) -> dict[str, str]:
    """Relative name -> md5 of the tracked files of a `DVCFileSystem.walk` (files only in the workspace left out)."""
    listing: dict[str, str] = {}
    for folder, _, files in walk:
        for name, entry in files.items():
            md5 = (entry.get("dvc_info") or {}).get("md5")
            if md5 is None:
                continue
            relpath = posixpath.relpath(posixpath.join(folder, name), top)
            problem = name_problem(relpath)
            if problem is not None:
                raise MalformedError(f"DVC's listing of {data_dir}: {printable(relpath)} is unsafe: {problem}")
            if not isinstance(md5, str) or not _MD5.fullmatch(md5):
                raise MalformedError(f"DVC's listing of {data_dir}: {printable(relpath)} has md5 {md5!r}")
            listing[relpath] = md5
    return listing


def dvc_record(start: Path, paths: Sequence[Path] = ()) -> DvcRecord | None:
    """DVC's record of the repository `start` is in, and the remote URL of each DVC out holding one of `paths`;
    None outside DVC.

    Args:
        start: A folder inside the repository (a cycle's working folder).
        paths: Paths (data dirs, manifests) whose DVC outs' URLs in the default remote to give.

    Returns:
        The record, or None when `start` is not in a DVC repository.

    Raises:
        DataDirError: `dvc.lock`, DVC's config or its DVC files cannot be read, or the default remote needs a DVC
            plugin that is not installed.
    """
    try:
        root = find_repo_root(Path(start).resolve())
    except DataDirError:
        return None
    lock = root / LOCK_FILE
    try:
        lock_sha256 = hashlib.sha256(read_regular(lock)).hexdigest() if lock.exists() else None
    except OSError as error:
        raise DataDirError(f"cannot read {lock}: {error.strerror}", path=str(lock)) from None
    remotes, data = _remotes_and_urls(root, paths)
    return DvcRecord(root, lock_sha256, remotes, data)


def remote_url(path: Path) -> str | None:
    """The URL, in its repository's default DVC remote, of the DVC out holding `path` (its object, or its `.dir`
    listing), with any credentials taken out: where another machine finds the data. None outside DVC, where no DVC
    out holds `path`, or without a remote.

    Args:
        path: A data dir or file inside a DVC repository.

    Returns:
        The URL, or None.

    Raises:
        DataDirError: DVC cannot read the repository's config, its DVC files or the out's listing, or the remote
            needs a DVC plugin that is not installed.
    """
    resolved = Path(path).resolve()
    try:
        root = find_repo_root(resolved)
    except DataDirError:
        return None
    _, urls = _remotes_and_urls(root, [resolved])
    return next(iter(urls.values()), None)


def _remotes_and_urls(root: Path, paths: Sequence[Path]) -> tuple[dict[str, str], dict[Path, str]]:
    """The repository's remotes (name -> URL) and the default remote's URL of each DVC out holding one of `paths`,
    all without credentials."""
    with _dvc_errors(root):
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            remotes = {name: _without_userinfo(str(conf["url"])) for name, conf in repo.config["remote"].items()}
            outs = [Path(out.fs_path) for out in repo.index.outs if out.use_cache]
        data = _remote_urls(root, outs, paths) if remotes else {}
    return remotes, data


def _remote_urls(root: Path, outs: Sequence[Path], paths: Sequence[Path]) -> dict[Path, str]:
    """Each DVC out holding one of `paths` -> its default remote's URL (its object, or its `.dir` listing)."""
    import dvc.api
    from dvc.config import NoRemoteError

    urls: dict[Path, str] = {}
    for path in paths:
        resolved = Path(path).resolve()
        out = next((o for o in outs if o == resolved or o in resolved.parents), None)
        if out is None or out in urls:
            continue
        try:
            urls[out] = _without_userinfo(dvc.api.get_url(out.relative_to(root).as_posix(), repo=str(root)))
        except NoRemoteError:
            return {}
    return urls


def _without_userinfo(url: str) -> str:
    """A remote URL with any user name and password taken out (they do not belong in a statement)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else "")))


@contextmanager
def _dvc_errors(root: Path) -> Iterator[None]:
    """DVC's own failures (config, DVC files, overlapping outs, a listing missing or malformed, a remote's plugin
    missing) as one-line DataDirErrors naming the repository."""
    from dvc.exceptions import DvcException
    from dvc_data.index.index import DataIndexError

    try:
        yield
    except DataIndexError as error:
        cause = error.__cause__
        why = f"{type(cause).__name__}: {' '.join(str(cause).split())}"[:200] if cause else "missing"
        raise DataDirError(
            f"DVC cannot load its listing in {root} ({why}): run `dvc pull`, or `dvc add` the data again",
            path=str(root),
        ) from None
    except (DvcException, RecursionError) as error:
        raise DataDirError(f"DVC cannot read {root}: {' '.join(str(error).split())}", path=str(root)) from None
    except OSError as error:
        raise DataDirError(f"DVC cannot read {root}: {error.strerror or error}", path=str(root)) from None
    except ImportError as error:  # a remote whose plugin (dvc-s3, dvc-gs, ...) is not installed
        raise DataDirError(f"DVC cannot read {root}: {error}", path=str(root)) from None
