"""The CLI conventions every command follows: version, help, exit codes, fast start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TRAINGUARD = str(Path(sys.executable).parent / "trainguard")
REPO = Path(__file__).resolve().parents[2]


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


def test_check_refuses_a_config_with_a_repeated_key_in_one_line_with_exit_2(tmp_path: Path) -> None:
    config = REPO / "configs" / "digits.yaml"
    text = config.read_text().replace("  enabled: true\n", "  enabled: true\n  enabled: false\n", 1)
    (tmp_path / "cycle.yaml").write_text(text)
    done = _run("check", str(tmp_path / "cycle.yaml"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "duplicate key 'enabled'" in done.stderr and "at line " in done.stderr
