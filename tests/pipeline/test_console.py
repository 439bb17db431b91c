"""`trainguard cycle` on the demo config prints trainguard's lines only; `--verbose` brings the libraries' back."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.pipeline.conftest import DigitsProject
from trainguard.pipeline import console

REPO = Path(__file__).resolve().parents[2]
TRAINGUARD = str(Path(sys.executable).parent / "trainguard")
THIRD_PARTY = (
    "GPU available",
    "TPU available",
    "litlogger",
    "deprecated",
    "val_dataloader",
    "Replacing",
    "INFO mlflow",
)


@pytest.mark.timeout(600)  # two cycles, each its own process
def test_a_cycle_on_the_demo_config_prints_no_third_party_chatter_and_verbose_shows_it(
    tmp_path: Path, cycle_config: Callable[..., dict[str, Any]]
) -> None:
    DigitsProject.laid_out(tmp_path).sign()
    any_model = {"min_clean_accuracy": 0.0, "min_robust_accuracy": 0.0, "max_accuracy_drop": 1.0, "max_class_drop": 1.0}
    # The cheapest cycle through every stage and line: one epoch each, RONI at a set rate (no rate probe) with the
    # fewest draws its level allows (draws + 1 >= 4 / level), one attack step; the verdicts are not under test.
    changes = {
        "training": {"bootstrap_epochs": 1},
        "trainer": {"init_args": {"max_epochs": 1}},
        "gate": any_model,
        "roni": {"level": 0.2, "calibration_draws": 19, "options": {"steps": 2, "checkpoints": 1, "lr": 0.05}},
        "adversarial": {"steps": 1},
        "robust_eval": {"subset_size": 16, "steps": 1},
    }
    (tmp_path / "cycle.yaml").write_text(yaml.safe_dump(cycle_config("console", changes)))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'fresh-mlruns.db'}"}

    def cycle(*flags: str, force: bool = False) -> str:
        done = subprocess.run(
            [TRAINGUARD, *flags, "cycle", "--config", "cycle.yaml", *(["--force"] if force else [])],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert "Traceback" not in done.stderr
        return done.stdout + done.stderr

    quiet = cycle()
    assert "cycle 1 accepted" in quiet, quiet
    for stage in ("verifying the signed shards", "fitting the first model", "screening 12 new shards", "training on"):
        assert f"trainguard: {stage}" in quiet, quiet  # off a terminal each stage says it started and ended
    assert quiet.count(" done in ") == 4, quiet
    assert not [noise for noise in (*THIRD_PARTY, "Warning", "warn") if noise in quiet], quiet
    assert "state" in quiet and "demo-work/cycle/state.json" in quiet  # the closing table says where things are
    verbose = cycle("--verbose", force=True)  # the same data again: only --force trains a second time
    assert "GPU available" in verbose and "litlogger" in verbose, verbose


def test_off_a_terminal_a_stage_prints_a_line_when_it_starts_and_when_it_ends(capsys: pytest.CaptureFixture) -> None:
    with console.stage("screening 6 shards", counting="copies") as progress:
        progress(3, 10)  # counted only where a bar shows it
        print("work", file=sys.stderr)
    with pytest.raises(RuntimeError), console.stage("training on 7 shards", display=False):
        raise RuntimeError("stopped")
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == ["trainguard: screening 6 shards ...", "work"]
    assert lines[2].startswith("trainguard: screening 6 shards done in ") and lines[2].endswith(" s")
    assert lines[3] == "trainguard: training on 7 shards ..."
    assert lines[4].startswith("trainguard: training on 7 shards stopped after ")
