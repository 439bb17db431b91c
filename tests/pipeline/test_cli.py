"""The CLI conventions every command follows: version, help, exit codes, fast start."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

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


EPOCHS_RUN = '''
import json

import pytorch_lightning as pl


class EpochsRun(pl.Callback):
    """Writes the epochs the cycle's fit was given and ran, when it ends."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with open(self.out, "w") as file:
            json.dump({"max_epochs": trainer.max_epochs, "ran": trainer.current_epoch}, file)
'''


def test_a_lightningcli_config_runs_a_cycle_with_a_dotted_override_shown_by_print_config(
    workdir: Path, cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """A config in LightningCLI's layout (flat trainer arguments, trainer.callbacks, the data module under `data:`)
    runs a cycle with `--trainer.max_epochs=1` over its 2; `--print-config` shows the value merged in, a mistyped
    override exits 2 in one line, and the cycle's summary prints its robust accuracy at every eps."""
    from tests.pipeline.conftest import quick_cycle, smallest_cycle

    (workdir / "epochs_run.py").write_text(EPOCHS_RUN)
    config = smallest_cycle(quick_cycle("cli-lightning"))
    callback = {"class_path": "epochs_run.EpochsRun", "init_args": {"out": str(workdir / "epochs.json")}}
    config["trainer"] = {**config["trainer"]["init_args"], "callbacks": [callback]}
    config["data"] = {"class_path": "trainguard.provenance.VerifiedDataModule", "init_args": {}}
    config["project"] = "."  # the callback's module; the digits example imports from the tests' path
    del config["callbacks"]
    (workdir / "cycle.yaml").write_text(yaml.safe_dump(config))
    assert config["trainer"]["max_epochs"] == 2

    shown = cli(workdir, "cycle", "--config", "cycle.yaml", "--print-config", "--trainer.max_epochs=1")
    assert shown.returncode == 0, shown.stderr
    printed = yaml.safe_load(shown.stdout)
    assert printed["trainer"]["init_args"]["max_epochs"] == 1 and printed["trainer"]["init_args"]["accelerator"]
    assert [c["class_path"] for c in printed["callbacks"]] == ["epochs_run.EpochsRun"]
    assert not (workdir / "demo-work" / "cycle").exists()

    checked = cli(workdir, "check", "cycle.yaml", "--trainer.max_epochs=1")
    assert checked.returncode == 0, checked.stderr
    assert "ready for `trainguard cycle --config cycle.yaml --trainer.max_epochs=1`" in checked.stdout

    typo = cli(workdir, "cycle", "--config", "cycle.yaml", "--trainer.max_epoch=1")
    assert typo.returncode == 2 and typo.stderr.count("\n") == 1 and "Traceback" not in typo.stderr
    assert "trainer.max_epoch: not an argument of pytorch_lightning.Trainer" in typo.stderr

    with socket.socket() as sock:  # MLflow unreachable: the cycle decides and reports locally
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    done = cli(workdir, "cycle", "--config", "cycle.yaml", "--trainer.max_epochs=1", env={"MLFLOW_TRACKING_URI": dead})
    assert done.returncode == 0, done.stderr
    assert json.loads((workdir / "epochs.json").read_text()) == {"max_epochs": 1, "ran": 1}
    robust = re.search(
        r"robust accuracy\W+(\d\.\d{3}) at eps 0, (\d\.\d{3}) at eps 0\.05, (\d\.\d{3}) at eps 0\.1\W", done.stdout
    )
    assert robust is not None, done.stdout
    report = json.loads((workdir / "demo-work" / "cycle" / "report.json").read_text())
    assert report["config"] == "demo-work/cycle/config-overridden.yaml"  # what ran, overrides in: its digest too
    ran = (workdir / report["config"]).read_bytes()
    assert report["config_sha256"] == hashlib.sha256(ran).hexdigest()
    assert yaml.safe_load(ran)["trainer"]["init_args"]["max_epochs"] == 1


def test_the_cycle_summary_reads_robust_accuracy_by_the_names_the_callback_logs_it_under() -> None:
    from trainguard.defenses import RobustAccuracy
    from trainguard.pipeline.commands.cycle import robust_accuracy

    logged = RobustAccuracy(eps=(0.0, 0.05, 0.1), attacks="autoattack-fast")
    names = logged.metric_names()
    per_attack = [name for names in logged.attack_metric_names().values() for name in names]
    metrics = {**dict.fromkeys(names, 0.5), **dict.fromkeys(per_attack, 0.25), "val/robust_acc_large_eps": 0.0}
    assert robust_accuracy(metrics) == {"0": 0.5, "0.05": 0.5, "0.1": 0.5}
