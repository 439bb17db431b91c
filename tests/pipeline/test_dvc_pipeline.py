"""The DVC pipeline (prepare -> sign -> cycle) parses in a real DVC repository and tracks the config's params."""

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
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
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
    report = f"{config.output.work_dir.as_posix()}/report.json"
    assert stages["cycle"]["metrics"] == [{report: {"cache": False}}]


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
    pipeline = dvc_repo / "dvc.yaml"
    pipeline.write_text(pipeline.read_text().replace("batch: 0", "batch: 1", 1))
    changed = _dvc(dvc_repo, "repro", "sign")
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert "Running stage 'prepare'" in changed.stdout and "Running stage 'sign'" in changed.stdout
    assert (dvc_repo / "demo-work/data/train/alice/b1-shard-00.parquet").is_file()
    assert _manifest_version(train_manifest) == 2  # persisted, so the re-sign bumps the version


def _shorten(config: Path) -> None:
    """A quick cycle whose gate accepts any model, so each `dvc repro` here exits 0."""
    data = yaml.safe_load(config.read_text())
    data["training"].update(bootstrap_epochs=15)
    data["trainer"]["init_args"].update(max_epochs=2)
    data["robust_eval"].update(subset_size=64, steps=2)
    data["gate"].update(min_clean_accuracy=0.0, min_robust_accuracy=0.0, max_accuracy_drop=1.0, max_class_drop=1.0)
    config.write_text(yaml.safe_dump(data))


@pytest.mark.slow
def test_dvc_repro_runs_the_pipeline_then_reruns_only_what_changed(dvc_repo: Path) -> None:
    _install(dvc_repo, with_code=True)
    _shorten(dvc_repo / "configs" / "digits.yaml")
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
