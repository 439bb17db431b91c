"""The DVC pipeline (prepare -> sign -> cycle) parses in a real DVC repository, tracks the config's params, and works
the way DVC users work: `dvc exp run -S`, `dvc exp show`, `dvc metrics diff`, `dvc plots show`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainguard.pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(BIN / "dvc"), *args], cwd=repo, capture_output=True, text=True, env=env, timeout=600)


def _install(repo: Path, with_code: bool = False) -> None:
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "configs", repo / "configs")
    shutil.copytree(ROOT / "examples", repo / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    if with_code:  # the cycle stage depends on the code, so a code change reruns it
        for package in ("trainguard", "pipeline", "defenses", "provenance"):
            shutil.copytree(ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))


def test_dvc_lists_the_three_stages_in_order(dvc_repo: Path) -> None:
    _install(dvc_repo)
    done = _dvc(dvc_repo, "stage", "list", "--name-only")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["prepare", "sign", "cycle"]
    dag = _dvc(dvc_repo, "dag", "--dot")
    assert dag.returncode == 0, dag.stderr
    assert '"prepare" -> "sign"' in dag.stdout and '"sign" -> "cycle"' in dag.stdout


def test_the_cycle_stage_tracks_params_that_exist_in_the_config() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (entry,) = stages["cycle"]["params"]
    ((params_file, keys),) = entry.items()
    config = load_config(ROOT / params_file, check_components=False)
    assert set(keys) <= set(config.model_fields_set)
    assert f"--config {params_file}" in stages["cycle"]["cmd"]
    metrics = f"{config.output.work_dir.as_posix()}/metrics.json"
    assert stages["cycle"]["metrics"] == [{metrics: {"cache": False, "persist": True}}]


def _manifest_version(path: Path) -> int:
    from trainguard.provenance.dsse import Envelope

    statement = json.loads(Envelope.from_json(path.read_bytes()).payload)
    return statement["predicate"]["version"]


def test_dvc_repro_prepares_and_signs_then_reruns_only_on_a_change(dvc_repo: Path) -> None:
    _install(dvc_repo)
    first = _dvc(dvc_repo, "repro", "sign")
    assert first.returncode == 0, first.stdout + first.stderr
    train_manifest = dvc_repo / "demo-work/data/train.manifest.json"
    assert _manifest_version(train_manifest) == 1
    assert (dvc_repo / "demo-work/keys/model.key").is_file()
    again = _dvc(dvc_repo, "repro", "sign")
    assert again.returncode == 0 and "Running stage" not in again.stdout
    params = dvc_repo / "params.yaml"
    params.write_text(params.read_text().replace("batch: 0", "batch: 1", 1))
    changed = _dvc(dvc_repo, "repro", "sign")
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert "Running stage 'prepare'" in changed.stdout and "Running stage 'sign'" in changed.stdout
    assert (dvc_repo / "demo-work/data/train/alice/b1-shard-00.parquet").is_file()
    assert _manifest_version(train_manifest) == 2  # persisted, so the re-sign bumps the version


def _shorten(config: Path, experiment: str) -> None:
    """A quick cycle whose gate accepts any model, so each `dvc repro` here exits 0 (RONI as tests/pipeline/
    conftest.py's QUICK_CYCLE screens), logging to the session's MLflow server as `experiment`."""
    data = yaml.safe_load(config.read_text())
    data["tracking"] = {"experiment_name": experiment, "registered_model_name": experiment}
    data["training"].update(bootstrap_epochs=15)
    data["trainer"]["init_args"].update(max_epochs=2)
    data["roni"].update(level=0.02, calibration_draws=199)
    data["robust_eval"].update(subset_size=50, steps=2)
    data["gate"].update(min_clean_accuracy=0.0, min_robust_accuracy=0.0, max_accuracy_drop=1.0, max_class_drop=1.0)
    config.write_text(yaml.safe_dump(data))


@pytest.mark.slow
@pytest.mark.timeout(900)  # two full cycles through `dvc repro`: 77 s quiet, over 300 s on a loaded machine
def test_dvc_repro_runs_the_pipeline_then_reruns_only_what_changed(dvc_repo: Path, mlflow_uri: str) -> None:
    _install(dvc_repo, with_code=True)
    _shorten(dvc_repo / "configs" / "digits.yaml", "dvc-repro")
    first = _dvc(dvc_repo, "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    assert (dvc_repo / "demo-work" / "cycle" / "report.json").is_file()
    again = _dvc(dvc_repo, "repro")
    assert again.returncode == 0 and "Running stage" not in again.stdout
    config = dvc_repo / "configs" / "digits.yaml"
    config.write_text(re.sub(r"max_epochs: \d+", "max_epochs: 1", config.read_text()))
    changed = _dvc(dvc_repo, "repro")
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert "Running stage 'cycle'" in changed.stdout and "Running stage 'prepare'" not in changed.stdout


def test_the_template_for_users_parses_in_a_real_dvc_repository(dvc_repo: Path) -> None:
    shutil.copy(ROOT / "examples" / "dvc" / "dvc.template.yaml", dvc_repo / "dvc.yaml")
    done = _dvc(dvc_repo, "stage", "list", "--name-only")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["sign", "cycle"]


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.timeout(900)  # two full cycles through `dvc repro`: 77 s quiet, over 300 s on a loaded machine
def test_dvc_experiments_set_params_compare_cycles_and_show_plots(dvc_repo: Path, mlflow_uri: str) -> None:
    _install(dvc_repo, with_code=True)
    _shorten(dvc_repo / "configs" / "digits.yaml", "dvc-experiments")
    _git(dvc_repo, "add", "-A")
    _git(dvc_repo, "commit", "-q", "-m", "pipeline")
    for epochs in (1, 2):
        knob = f"configs/digits.yaml:trainer.init_args.max_epochs={epochs}"
        done = _dvc(dvc_repo, "exp", "run", "-S", knob, "-S", "prepare.seed=0")
        assert done.returncode == 0, done.stdout + done.stderr
    shown = _dvc(dvc_repo, "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    experiments = [e for row in json.loads(shown.stdout) for e in row.get("experiments") or []]
    cycles = sorted(
        (
            exp["revs"][0]["data"]["params"]["configs/digits.yaml"]["data"]["trainer"]["init_args"]["max_epochs"],
            exp["revs"][0]["data"]["metrics"]["demo-work/cycle/metrics.json"]["data"]["cycle/number"],
        )
        for exp in experiments
    )
    assert cycles == [(1, 1), (2, 2)]  # each experiment ran its own cycle, both compared in one table
    first, second = (e["revs"][0]["data"]["rev"] for e in experiments)
    diff = _dvc(dvc_repo, "metrics", "diff", first, second, "--json")
    assert diff.returncode == 0 and "cycle/number" in json.loads(diff.stdout)["demo-work/cycle/metrics.json"]
    plots = _dvc(dvc_repo, "plots", "show", "--json")
    assert plots.returncode == 0, plots.stderr
    shown_plots = json.loads(plots.stdout)
    assert not shown_plots.get("errors"), shown_plots["errors"]
    assert {"robust accuracy vs eps", "accuracy across cycles", "gate per-class accuracy"} <= set(shown_plots["data"])
    assert all(shown_plots["data"].values()), "every plot found its data"
