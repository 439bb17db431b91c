"""Path safety: shard names are relative, normalized POSIX paths; symlinks and non-regular files are refused."""

from __future__ import annotations

import os
import posixpath
import re
import stat
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN = re.compile(r"(?:[A-Za-z0-9_-][A-Za-z0-9_.-]*/)*[A-Za-z0-9_-][A-Za-z0-9_.-]*")
"""Names safe at a glance: segments of letters, digits, `_.-` that never start with a dot (so never `.` or `..`)."""


def printable(text: str) -> str:
    """`text` with every non-printable character (C0, DEL, C1, line/paragraph separators, the surrogates that
    stand for non-UTF-8 bytes of a file name) written as a Python escape, so it can never start a new output line."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def name_problem(name: str) -> str | None:
    """Why `name` is not a safe shard name (a short phrase), or None when it is safe."""
    if _PLAIN.fullmatch(name):
        return None
    if not name:
        return "empty name"
    if _SURROGATE.search(name):
        return "not valid UTF-8"
    if _CONTROL.search(name):
        return "contains a control character"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "contains '..'"
    if posixpath.normpath(name) != name or "." in parts:
        return "not normalized"
    return None


def entry_problem(root: Path, name: str) -> tuple[str, str] | None:
    """(reason, detail) if `root/name` is missing, reached through a symlink, or not a regular file; else None."""
    current = root
    parts = name.split("/")
    for index, part in enumerate(parts):
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            return "missing", "the shard file does not exist"
        except NotADirectoryError:
            return "missing", f"{'/'.join(parts[:index])} is not a directory"
        if stat.S_ISLNK(mode):
            where = "the shard" if index == len(parts) - 1 else f"folder {'/'.join(parts[: index + 1])}"
            return "symlink", f"{where} is a symbolic link"
        if index < len(parts) - 1 and not stat.S_ISDIR(mode):
            return "missing", f"{'/'.join(parts[: index + 1])} is not a directory"
    if not stat.S_ISREG(mode):
        return "not-regular", "the shard is not a regular file"
    return None


def walk_entries(root: Path, skip: Collection[Path] = ()) -> Iterator[tuple[str, str]]:
    """(relative POSIX name, kind) of every entry under `root`, not following symlinks; kind: file, symlink, other.

    Kinds come from the directory listing itself (no stat per entry where the file system reports types)."""
    skipped = skipped_names(root, skip)
    stack = [(os.fspath(root), "")]
    while stack:
        folder, prefix = stack.pop()
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=_entry_name)
        for entry in entries:
            name = prefix + entry.name
            if name in skipped:
                continue
            kind = _kind(entry)
            if kind == "folder":
                stack.append((entry.path, name + "/"))
            else:
                yield name, kind


def skipped_names(root: Path, skip: Collection[Path]) -> set[str]:
    """The names under `root` (as `walk_entries` gives them) of the paths in `skip`."""
    top = os.path.abspath(root)
    return {os.path.relpath(os.path.abspath(p), top) for p in skip}


def reached(names: Iterable[str], skipped: Collection[str]) -> list[str]:
    """The `names` a walk that skips the names `skipped` (files, or folders with all below them) reaches."""
    below = tuple(folder + "/" for folder in skipped)
    return [name for name in names if name not in skipped and not name.startswith(below)]


def folder_entries(root: Path, names: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(relative name, kind) of the entries of just the folders that hold `names`, one listing each, not walking
    the rest of `root`. A folder with an unsafe name, or reached through a symlink or a non-folder, is not listed:
    its names are left to `entry_problem`."""
    for folder in sorted({name.rpartition("/")[0] for name in names}):
        if folder and (name_problem(folder) is not None or not _real_folder(root, folder)):
            continue
        prefix = folder + "/" if folder else ""
        try:
            listing = os.scandir(os.path.join(root, folder))
        except OSError:
            continue
        with listing:
            for entry in listing:
                kind = _kind(entry)
                if kind != "folder":
                    yield prefix + entry.name, kind


def _real_folder(root: Path, folder: str) -> bool:
    """Whether every component of `folder` under `root` is a folder, none a symlink."""
    current = os.fspath(root)
    for part in folder.split("/"):
        current = os.path.join(current, part)
        try:
            if not stat.S_ISDIR(os.lstat(current).st_mode):
                return False
        except OSError:
            return False
    return True


def _kind(entry: os.DirEntry[str]) -> str:
    if entry.is_symlink():
        return "symlink"
    if entry.is_dir(follow_symlinks=False):
        return "folder"
    return "file" if entry.is_file(follow_symlinks=False) else "other"


def _entry_name(entry: os.DirEntry[str]) -> str:
    return entry.name
