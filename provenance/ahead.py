"""Hashing a data dir's small files ahead, in forked child processes, while the verifier imports what it needs and
reads and checks the manifest. Threads of one process barely overlap that GIL-bound work (a thread that hashed a
file waits a whole switch interval for the GIL back, and two hashing threads share one GIL), processes do: on 2
cores, `trainguard verify` of 10,000 small shards then costs little more than their hashing.

Only a single-threaded process forks (the command line, before it starts anything else): in a threaded one a child
could deadlock on a lock held by a thread that does not exist there. What the children report is only compared with
the verified manifest; if one fails, none of it is used and the verifier hashes those files itself. They hash whole
files by BLAKE3 only: they fork before the manifest says which shards are chunk-signed, so the verifier hashes those
itself, chunk digests and all (`verify._hashed_ahead`).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import NoReturn

from trainguard.provenance.hashing import SMALL_FILE, FileDigest, HashJob, Whole, digest_jobs
from trainguard.provenance.paths import walk_entries

AHEAD: tuple[Whole, ...] = ("blake3",)
"""The digest hashed ahead: the one verification checks wherever the manifest signs it."""


class HashAhead:
    """Forked children hashing the small regular files of a walk of `root`, each a share of them in one thread (no
    GIL between them)."""

    MAX_CHILDREN = 16

    def __init__(self, root: Path, entries: dict[str, str], children: list[tuple[int, int]]) -> None:
        self.root = root
        self.entries = entries
        """The walk of `root` (every entry's kind, as `walk_entries` gives them), done before the children forked."""
        self._children = children
        self._done = False

    @classmethod
    def start(cls, root: Path, workers: int | None = None) -> HashAhead | None:
        """Walks `root` and forks `workers` children (default: one per core, at most MAX_CHILDREN); None where this
        process may not fork (it has threads, or no fork) or the walk fails (the shard checks then walk again and
        report it in their order)."""
        if not hasattr(os, "fork") or threading.active_count() > 1:
            return None
        try:
            entries = dict(walk_entries(Path(root)))
        except OSError:
            return None
        files = [name for name, kind in entries.items() if kind == "file"]
        count = max(1, min(workers or os.cpu_count() or 1, cls.MAX_CHILDREN, len(files)))
        children: list[tuple[int, int]] = []
        for index in range(count):
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_end)
                for _, other in children:
                    os.close(other)
                _child(os.path.join(os.fspath(root), ""), files[index::count], write_end)
            os.close(write_end)
            children.append((pid, read_end))
        return cls(Path(root), entries, children)

    def digests(self) -> dict[str, FileDigest]:
        """The children's digests by name, once all have finished; none when one failed (or they were stopped)."""
        if self._done:
            return {}
        self._done = True
        reports, failed = [], False
        for pid, read_end in self._children:
            with os.fdopen(read_end, "rb") as stream:
                reports.append(stream.read())
            failed = os.waitpid(pid, 0)[1] != 0 or failed
        if failed:
            return {}
        try:
            rows = [row for data in reports for row in json.loads(data)]
        except ValueError:
            return {}
        return {name: FileDigest(None, size, blake3=digest) for name, size, digest in rows}

    def close(self) -> None:
        """Stops children whose digests were not collected (a refused manifest, or one that signs no BLAKE3): none
        outlives the verification."""
        if self._done:
            return
        self._done = True
        for pid, read_end in self._children:
            os.kill(pid, signal.SIGKILL)
            os.close(read_end)
            os.waitpid(pid, 0)


def _child(base: str, names: list[str], write_end: int) -> NoReturn:
    """A forked child: hashes the small files among `names` (under `base`) in one thread, writes `[name, size,
    digest]` rows as JSON and exits without running the parent's exit handlers or flushing its buffers."""
    code = 1
    try:
        jobs = [HashJob(name, base + name, 0, None, AHEAD) for name in names]
        outcomes = digest_jobs(jobs, workers=1, hash_if=lambda job, size: size <= SMALL_FILE)
        rows = [
            [job.name, outcome.size, outcome.blake3]
            for job, outcome in zip(jobs, outcomes, strict=True)
            if isinstance(outcome, FileDigest)
        ]
        with os.fdopen(write_end, "wb") as stream:
            stream.write(json.dumps(rows).encode())
        code = 0
    finally:
        os._exit(code)
