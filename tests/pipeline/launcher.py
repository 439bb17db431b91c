"""The client side of `ddp_job.py --serve`: one job's ranks run on the launcher, and the job's process group is
killed whole when it outlives its timeout (a hung collective must fail the test, not hang the suite)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from typing import Any


def answer(launcher: subprocess.Popen[bytes]) -> int:
    """The launcher's next reply: a job's process group id, then its exit code."""
    assert launcher.stdout is not None
    line = launcher.stdout.readline()
    if not line:
        raise RuntimeError(f"the launcher ended (exit code {launcher.wait()}); its stderr is in the test's output")
    return int(line)


def run_ranks(launcher: subprocess.Popen[bytes], request: dict[str, Any], timeout: float) -> tuple[int, bool]:
    """Sends one job to the launcher and waits for it: its exit code, and whether it was killed for outliving
    `timeout` seconds."""
    assert launcher.stdin is not None
    launcher.stdin.write(json.dumps(request).encode() + b"\n")
    launcher.stdin.flush()
    job = answer(launcher)
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        os.killpg(job, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    returncode = answer(launcher)
    timer.cancel()
    return returncode, killed.is_set()
