"""DVC cross-check: the md5 DVC records for each file of a tracked data dir (`DIR.dvc` or `dvc.lock` outs).

md5 is never a security decision here: it is only compared beside the signed SHA-256, to catch a data dir that
drifted from what DVC tracks (or a manifest signed over different files than the ones DVC versions).
"""

from __future__ import annotations

import configparser
import hashlib
import re
from pathlib import Path
from typing import Any

from trainguard import strictjson
from trainguard.files import read_regular
from trainguard.provenance.errors import DataDirError, DvcMismatchError, MalformedError
from trainguard.provenance.paths import name_problem, printable

_MD5 = re.compile(r"[0-9a-f]{32}")


def find_repo_root(start: Path) -> Path:
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    raise DataDirError(f"{start} is not inside a DVC repository (no .dvc folder above it)", path=str(start))


def dvc_tracked_md5(data_dir: Path) -> dict[str, str]:
    """Relative POSIX name -> md5 of every file DVC tracks under `data_dir`; refuses disagreeing records.

    The md5s are only compared beside the signed digests (signing and verifying with `dvc`), never trusted alone.

    Args:
        data_dir: A folder DVC tracks as a directory (`DIR.dvc` beside it, or an out of a `dvc.lock` up to the
            repository root).

    Returns:
        Each tracked file's path relative to `data_dir` mapped to its md5, from the DVC cache's `.dir` listing.

    Raises:
        DataDirError: Not inside a DVC repository, not tracked (as a directory), a DVC file or config that cannot
            be read or parsed, or no listing in the cache.
        DvcMismatchError: DVC's records of the folder disagree, or the cache listing does not match its md5.
        MalformedError: The cache listing is malformed (not a list of safe, distinct names with md5s).
    """
    data_dir = Path(data_dir).resolve()
    root = find_repo_root(data_dir)
    dir_md5s = {md5 for _, md5 in _records(data_dir, root)}
    if not dir_md5s:
        raise DataDirError(f"{data_dir} is not tracked by DVC (no {data_dir.name}.dvc nor dvc.lock out)")
    if len(dir_md5s) > 1:
        raise DvcMismatchError(f"DVC records of {data_dir} disagree ({', '.join(sorted(dir_md5s))}): run `dvc status`")
    return _listing(root, dir_md5s.pop())


def _records(data_dir: Path, root: Path) -> list[tuple[Path, str]]:
    found = []
    dvc_file = data_dir.parent / f"{data_dir.name}.dvc"
    if dvc_file.is_file():
        found += _outs(_yaml(dvc_file).get("outs"), dvc_file, data_dir)
    for folder in (data_dir.parent, *data_dir.parent.parents):
        lock = folder / "dvc.lock"
        if lock.is_file():
            for stage in (_yaml(lock).get("stages") or {}).values():
                found += _outs((stage or {}).get("outs"), lock, data_dir)
        if folder == root:
            break
    return found


def _outs(outs: Any, record: Path, data_dir: Path) -> list[tuple[Path, str]]:
    found = []
    for out in outs or []:
        if not isinstance(out, dict) or not isinstance(out.get("path"), str):
            continue
        if (record.parent / out["path"]).resolve() == data_dir:
            md5 = out.get("md5")
            if not isinstance(md5, str) or not md5.endswith(".dir"):
                raise DataDirError(f"{record}: {out['path']} is not tracked as a directory by DVC", path=str(record))
            found.append((record, md5))
    return found


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        document = yaml.safe_load(read_regular(path).decode("utf-8"))
    except OSError as error:
        raise DataDirError(f"cannot read DVC file {path}: {error.strerror}", path=str(path)) from None
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError) as error:
        raise DataDirError(f"cannot parse DVC file {path}: {' '.join(str(error).split())}", path=str(path)) from None
    return document if isinstance(document, dict) else {}


def _cache_dir(root: Path) -> Path:
    config = configparser.ConfigParser()
    for path in (root / ".dvc" / "config", root / ".dvc" / "config.local"):
        try:
            config.read_string(read_regular(path).decode("utf-8"), source=str(path))
        except FileNotFoundError:
            continue
        except OSError as error:
            raise DataDirError(f"cannot read DVC config {path}: {error.strerror}", path=str(path)) from None
        except (UnicodeDecodeError, configparser.Error) as error:
            raise DataDirError(
                f"cannot parse DVC config {path}: {' '.join(str(error).split())}", path=str(path)
            ) from None
    configured = config.get("cache", "dir", fallback=None)
    return (root / ".dvc" / configured).resolve() if configured else root / ".dvc" / "cache"


def _listing(root: Path, dir_md5: str) -> dict[str, str]:
    digest = dir_md5.removesuffix(".dir")
    cache = _cache_dir(root)
    for candidate in (cache / "files" / "md5" / digest[:2] / (digest[2:] + ".dir"), cache / digest[:2] / digest[2:]):
        if candidate.is_file():
            try:
                data = read_regular(candidate)
            except OSError as error:
                raise DataDirError(f"cannot read DVC cache listing {candidate}: {error.strerror}") from None
            if hashlib.md5(data, usedforsecurity=False).hexdigest() != digest:
                raise DvcMismatchError(f"DVC cache listing {candidate} does not match its md5 {digest}")
            return _parse_listing(data, candidate)
    raise DataDirError(f"DVC cache has no listing for {dir_md5} under {cache}: run `dvc checkout` or `dvc pull`")


def _parse_listing(data: bytes, where: Path) -> dict[str, str]:
    """Relative name -> md5 from a DVC `.dir` listing: a strict JSON list of {relpath, md5} objects with safe,
    distinct names and lowercase hex md5s; anything else is a MalformedError naming the listing."""
    try:
        entries = strictjson.loads(data)
    except strictjson.StrictJSONError as error:
        raise MalformedError(f"DVC cache listing {where} is not strict JSON: {error}", path=str(where)) from None
    if not isinstance(entries, list):
        raise MalformedError(f"DVC cache listing {where} is not a JSON list", path=str(where))
    listing: dict[str, str] = {}
    for index, entry in enumerate(entries):
        relpath = entry.get("relpath") if isinstance(entry, dict) else None
        md5 = entry.get("md5") if isinstance(entry, dict) else None
        if not isinstance(relpath, str) or not isinstance(md5, str):
            raise MalformedError(f"DVC cache listing {where}: entry {index} is not a {{relpath, md5}} object")
        problem = name_problem(relpath)
        if problem is not None:
            raise MalformedError(f"DVC cache listing {where}: relpath {relpath!r} is unsafe: {problem}")
        if not _MD5.fullmatch(md5):
            raise MalformedError(f"DVC cache listing {where}: {printable(relpath)} has md5 {md5!r}, not 32 hex digits")
        if relpath in listing:
            raise MalformedError(f"DVC cache listing {where}: {printable(relpath)} is listed twice")
        listing[relpath] = md5
    return listing
