"""The shared file I/O: atomic writes never follow planted links; control files are regular, bounded reads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainguard.files import atomic_write, read_regular
from trainguard.strictjson import StrictJSONError, loads


def test_atomic_write_replaces_a_planted_symlink_instead_of_following_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    target = tmp_path / "state.json"
    target.symlink_to(victim)
    atomic_write(target, b"new")
    assert victim.read_bytes() == b"keep"
    assert not target.is_symlink() and target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_atomic_write_sets_the_requested_mode(tmp_path: Path) -> None:
    atomic_write(tmp_path / "secret", b"x", mode=0o600)
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "manifest.json"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            read_regular(fifo)
        except OSError as error:
            outcome.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(timeout=5)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert "not a regular file" in str(outcome[0])


def test_a_device_is_refused_before_any_read() -> None:
    with pytest.raises(OSError, match="not a regular file"):
        read_regular(Path("/dev/zero"))


def test_a_file_over_the_limit_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * 101)
    with pytest.raises(OSError, match="100-byte limit"):
        read_regular(big, limit=100)
    assert read_regular(big, limit=101) == b"x" * 101


def test_a_symlink_is_refused_when_links_are_not_followed(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError, match="symbolic link"):
        read_regular(tmp_path / "link", follow_symlinks=False)


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        (b'{"a": 1, "a": 2}', "duplicate key"),
        (b'\xef\xbb\xbf{"a": 1}', "byte-order mark"),
        (b'{"a": NaN}', "NaN"),
        (b'{"a": -Infinity}', "Infinity"),
        (b'{"version": 1e400}', "overflows"),
        (b'{"version": ' + b"9" * 40 + b"}", "too long"),
        (b'{"a": "\xff"}', "not UTF-8"),
        (b"[" * 100 + b"]" * 100, "deeper"),
        (b'{"a": 1} {"b": 2}', "Extra data"),
    ],
)
def test_ambiguous_json_is_refused(document: bytes, problem: str) -> None:
    with pytest.raises(StrictJSONError, match=problem):
        loads(document)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_every_plain_json_document_parses_to_itself(value: object) -> None:
    import json

    assert loads(json.dumps(value).encode()) == value
