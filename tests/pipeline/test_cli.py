"""The CLI conventions every command follows: version, help, exit codes, fast start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TRAINGUARD = str(Path(sys.executable).parent / "trainguard")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TRAINGUARD, *args], capture_output=True, text=True, timeout=120)


def test_version_prints_the_package_version() -> None:
    done = _run("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("trainguard 0.")


def test_unknown_command_is_a_usage_error_with_exit_2() -> None:
    done = _run("no-such-command")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr


def test_cli_starts_without_importing_torch() -> None:
    code = "import sys, trainguard.pipeline.cli; print('torch' in sys.modules, 'pytorch_lightning' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
