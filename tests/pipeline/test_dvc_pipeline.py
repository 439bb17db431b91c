"""The DVC pipeline (prepare -> sign -> cycle) parses in a real DVC repository, tracks the config's params, and works
the way DVC users work: `dvc repro`, `dvc exp run -S`, `dvc exp show`, `dvc metrics diff`, `dvc plots show`.

Each trainguard command a stage runs is its own process (a cycle imports torch, Lightning and MLflow: most of its
cost), so the repository is prepared once for the module (`prepared`): the pipeline installed and committed, with
prepare and sign run by `dvc repro sign`; each test works in its own copy."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.pipeline.conftest import smallest_cycle
from trainguard.pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(BIN / "dvc"), *args], cwd=repo, capture_output=True, text=True, env=env, timeout=600)


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)


def _install(repo: Path, with_code: bool = False) -> None:
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "configs", repo / "configs")
    shutil.copytree(ROOT / "examples", repo / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    if with_code:  # the cycle stage depends on the code, so a code change reruns it
        for package in ("trainguard", "pipeline", "defenses", "provenance"):
            shutil.copytree(ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))


def _shorten(config: Path, experiment: str) -> None:
    """A quick cycle whose gate accepts any model, so each `dvc repro` here exits 0, logging to the session's MLflow
    server as `experiment`. Every stage runs at its smallest cost: what these tests check is DVC's view of the cycle
    (which stages run, the params, metrics and plots it leaves), not what the cycle decides."""
    data = yaml.safe_load(config.read_text())
    data = smallest_cycle(data)
    data["tracking"] = {"experiment_name": experiment, "registered_model_name": experiment}
    config.write_text(yaml.safe_dump(data))


@dataclass(frozen=True)
class Prepared:
    """`bare`: a fresh git + DVC repository; `repo`: one with the pipeline installed (the code included, the cycle
    shortened) where `dvc repro sign` ran (`first`, before anything else) and everything is committed."""

    bare: Path
    repo: Path
    first: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    root = tmp_path_factory.mktemp("dvc-pipeline")
    bare, repo = root / "bare", root / "repo"
    bare.mkdir()
    with pytest.MonkeyPatch.context() as env:  # as tests/conftest.py's per-test environment, which is not set up yet
        env.setenv("DVC_NO_ANALYTICS", "1")
        env.setenv("TRAINGUARD_HOME", str(root / "trainguard-home"))
        _git(bare, "init", "-q", "-b", "main")
        _git(bare, "config", "user.email", "ci@trainguard.invalid")
        _git(bare, "config", "user.name", "trainguard tests")
        for args in (("init", "-q"), ("config", "core.analytics", "false")):
            done = _dvc(bare, *args)
            assert done.returncode == 0, done.stderr
        _git(bare, "add", "-A")
        _git(bare, "commit", "-q", "-m", "init")
        shutil.copytree(bare, repo, symlinks=True)
        _install(repo, with_code=True)
        _shorten(repo / "configs" / "digits.yaml", "dvc-pipeline")
        first = _dvc(repo, "repro", "sign")
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", "pipeline")
    return Prepared(bare, repo, first)


def _copy(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "repo", symlinks=True))


def test_dvc_lists_the_three_stages_in_order(prepared: Prepared, tmp_path: Path) -> None:
    repo = _copy(prepared.bare, tmp_path)
    _install(repo)
    done = _dvc(repo, "stage", "list", "--name-only")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["prepare", "sign", "cycle"]
    dag = _dvc(repo, "dag", "--dot")
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


def test_dvc_repro_prepares_and_signs_then_reruns_only_on_a_change(prepared: Prepared, tmp_path: Path) -> None:
    first = prepared.first  # `dvc repro sign` in the freshly installed pipeline
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'prepare'" in first.stdout and "Running stage 'sign'" in first.stdout
    repo = _copy(prepared.repo, tmp_path)
    train_manifest = repo / "demo-work/data/train.manifest.json"
    assert _manifest_version(train_manifest) == 1
    assert (repo / "demo-work/keys/model.key").is_file()
    again = _dvc(repo, "repro", "sign")
    assert again.returncode == 0 and "Running stage" not in again.stdout
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("batch: 0", "batch: 1", 1))
    changed = _dvc(repo, "repro", "sign")
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert "Running stage 'prepare'" in changed.stdout and "Running stage 'sign'" in changed.stdout
    assert (repo / "demo-work/data/train/alice/b1-shard-00.parquet").is_file()
    assert _manifest_version(train_manifest) == 2  # persisted, so the re-sign bumps the version


def test_the_template_for_users_parses_in_a_real_dvc_repository(prepared: Prepared, tmp_path: Path) -> None:
    repo = _copy(prepared.bare, tmp_path)
    shutil.copy(ROOT / "examples" / "dvc" / "dvc.template.yaml", repo / "dvc.yaml")
    done = _dvc(repo, "stage", "list", "--name-only")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["sign", "cycle"]


@pytest.mark.slow
@pytest.mark.timeout(900)  # two cycles through DVC: a few minutes on a loaded machine
def test_dvc_repro_reruns_only_what_changed_and_experiments_set_params_compare_cycles_and_show_plots(
    prepared: Prepared, tmp_path: Path, mlflow_uri: str
) -> None:
    """Two cycles, each with its own epochs, compared as experiments: the first run by `dvc exp run -S` (prepare and
    sign are up to date from `prepared`, so only the cycle runs), the second by `dvc repro` once the config changed by
    hand (nothing reruns before the change; after it, the cycle and not prepare), saved with `dvc exp save`."""
    repo = _copy(prepared.repo, tmp_path)
    config = repo / "configs" / "digits.yaml"
    knob = "configs/digits.yaml:trainer.init_args.max_epochs=1"
    done = _dvc(repo, "exp", "run", "-S", knob, "-S", "prepare.seed=0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Running stage 'cycle'" in done.stdout and "Running stage 'prepare'" not in done.stdout  # signed already
    assert (repo / "demo-work" / "cycle" / "report.json").is_file()
    again = _dvc(repo, "repro")
    assert again.returncode == 0 and "Running stage" not in again.stdout
    config.write_text(re.sub(r"max_epochs: \d+", "max_epochs: 2", config.read_text()))
    changed = _dvc(repo, "repro")
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert "Running stage 'cycle'" in changed.stdout and "Running stage 'prepare'" not in changed.stdout
    # the cycle's metrics and plots are untracked here (no cycle ran in the commit): the experiment takes them along
    saved = _dvc(repo, "exp", "save", "-I", "demo-work/cycle/metrics.json", "-I", "demo-work/cycle/plots")
    assert saved.returncode == 0, saved.stdout + saved.stderr

    shown = _dvc(repo, "exp", "show", "--json")
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
    diff = _dvc(repo, "metrics", "diff", first, second, "--json")
    assert diff.returncode == 0 and "cycle/number" in json.loads(diff.stdout)["demo-work/cycle/metrics.json"]
    plots = _dvc(repo, "plots", "show", "--json")
    assert plots.returncode == 0, plots.stderr
    shown_plots = json.loads(plots.stdout)
    assert not shown_plots.get("errors"), shown_plots["errors"]
    assert {"robust accuracy vs eps", "accuracy across cycles", "gate per-class accuracy"} <= set(shown_plots["data"])
    assert all(shown_plots["data"].values()), "every plot found its data"
