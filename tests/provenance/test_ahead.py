"""Hashing ahead in forked children: the digests and walk they give, no child left behind, no fork with threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import blake3

from trainguard.provenance.ahead import HashAhead
from trainguard.provenance.hashing import SMALL_FILE
from trainguard.provenance.paths import reached, skipped_names, walk_entries


def _in_a_fresh_process(code: str, *args: str) -> str:
    """`code` run by a new interpreter (single-threaded, unlike a test worker, so it may fork); its stdout."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _tree(root: Path) -> Path:
    (root / "a").mkdir(parents=True)
    (root / "a" / "one.bin").write_bytes(os.urandom(1000))
    (root / "two.bin").write_bytes(b"")
    (root / "three.bin").write_bytes(os.urandom(70_000))
    (root / "large.bin").write_bytes(bytes(SMALL_FILE + 1))
    (root / "link.bin").symlink_to(root / "two.bin")
    return root


def test_children_hash_every_small_file_of_the_walk_and_leave_large_ones_to_the_verifier(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data")
    code = """
import json, sys
from pathlib import Path
from trainguard.provenance.ahead import HashAhead
ahead = HashAhead.start(Path(sys.argv[1]), workers=2)
print(json.dumps([ahead.entries, {name: [d.size, d.blake3] for name, d in ahead.digests().items()}]))
"""
    entries, digests = json.loads(_in_a_fresh_process(code, str(root)))
    assert entries == dict(walk_entries(root))
    small = [name for name, kind in entries.items() if kind == "file" and name != "large.bin"]
    assert digests == {
        name: [(root / name).stat().st_size, blake3.blake3((root / name).read_bytes()).hexdigest()] for name in small
    }


def test_closing_before_the_result_leaves_no_child_process(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data")
    code = """
import os, sys
from pathlib import Path
from trainguard.provenance.ahead import HashAhead
ahead = HashAhead.start(Path(sys.argv[1]), workers=3)
ahead.close()
try:
    os.waitpid(-1, os.WNOHANG)
except ChildProcessError:
    print("no child left")
print(ahead.digests())
"""
    assert _in_a_fresh_process(code, str(root)).split("\n")[:2] == ["no child left", "{}"]


def test_a_process_with_threads_does_not_fork(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data")
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert HashAhead.start(root) is None
    finally:
        release.set()
        other.join()


def test_the_walk_ahead_less_the_skipped_paths_is_the_walk_that_skips_them(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data")
    (root / "manifest.json").write_text("{}")
    (root / "manifest.json.bins").mkdir()
    (root / "manifest.json.bins" / "00000.json").write_text("{}")
    skip = [root / "manifest.json", root / "manifest.json.bins", tmp_path / "state.json"]
    names = [name for name, _ in walk_entries(root)]
    assert reached(names, skipped_names(root, skip)) == [name for name, _ in walk_entries(root, skip)]
