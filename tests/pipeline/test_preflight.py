"""Every mistake a new user makes in a cycle config is found before any training, by `trainguard check` and at
the start of `trainguard cycle`: one line, exit 2 for bad input / 1 for a failed check, and nothing left behind
(no state, no model)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from digits_demo.demo import create_keys, sign_contributions, sign_trusted
from digits_demo.prepare import prepare_digits

from trainguard.pipeline.cli import main
from trainguard.provenance.keys import generate_signing_key, write_keypair

REPO = Path(__file__).resolve().parents[2]
Cli = Callable[..., subprocess.CompletedProcess[str]]
TRAINGUARD = str(Path(sys.executable).parent / "trainguard")

REGRESSION_MODEL = """
import pytorch_lightning as pl
import torch
from digits_demo.models import DigitsClassifier


class Regressor(DigitsClassifier):
    def forward(self, x):
        return super().forward(x)[:, :1]


class NoValidation(DigitsClassifier):
    validation_step = pl.LightningModule.validation_step


class Tempered(DigitsClassifier):
    def forward(self, x):
        return super().forward(x) / 2.0  # after its last Linear layer: the detectors' head is not the whole tail


class WrongWidth(DigitsClassifier):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.first(x)
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits demo's layout, signed, with the config and two broken models beside it (shared read-only)."""
    root = tmp_path_factory.mktemp("preflight")
    (root / "configs").mkdir()
    shutil.copy(REPO / "configs" / "digits-trust.yaml", root / "configs")
    keys, data = root / "demo-work" / "keys", root / "demo-work" / "data"
    create_keys(keys)
    write_keypair(generate_signing_key("ed25519"), keys / "wrongtype")
    contributed = prepare_digits(data).contributed()
    sign_trusted(data, keys)
    sign_contributions(data, keys, contributed)
    (root / "brokenmodels.py").write_text(REGRESSION_MODEL)
    _sign_curated(data, keys, "realheld", _real_targets)
    _sign_curated(data, keys, "nineless", _no_nines)
    return root


def _sign_curated(data: Path, keys: Path, name: str, change: Callable[[pd.DataFrame, bool], pd.DataFrame]) -> None:
    """The curator's trusted base and held-out set, each table changed by `change(frame, is_holdout)`, signed as
    `name/` (dataset digits-trusted, so a config names it instead of `trusted/`, never beside it)."""
    from trainguard.provenance.keys import load_signing_key
    from trainguard.provenance.signing import sign_dataset, write_manifest

    (data / name).mkdir()
    for table in ("base", "holdout"):
        frame = pd.read_parquet(data / "trusted" / f"{table}.parquet")
        change(frame, table == "holdout").to_parquet(data / name / f"{table}.parquet")
    envelope, _ = sign_dataset(
        data / name,
        load_signing_key(keys / "curator.key"),
        dataset="digits-trusted",
        source="curator",
        role="trusted",
        roles={"holdout.*": "holdout"},
    )
    write_manifest(envelope, data / f"{name}.manifest.json")


def _real_targets(frame: pd.DataFrame, holdout: bool) -> pd.DataFrame:
    """Real-valued targets (label / 9): data for a regression task, or for a classification config that does not
    fit it."""
    return frame.assign(label=(frame["label"] / 9).astype(np.float32))


def _no_nines(frame: pd.DataFrame, holdout: bool) -> pd.DataFrame:
    """A held-out set the gate cannot measure class 9 on."""
    return frame[frame["label"] != 9] if holdout else frame


def _curated(name: str) -> dict[tuple[str, ...], Any]:
    """A config's trusted base and held-out set from `_sign_curated`'s `name/`, the contributions as before."""
    ref = {
        "manifest": f"demo-work/data/{name}.manifest.json",
        "dataset": "digits-trusted",
        "data_dir": f"demo-work/data/{name}",
    }
    contributed = {
        "manifest": "demo-work/data/train.manifest.json",
        "dataset": "digits-contributed",
        "data_dir": "demo-work/data/train",
    }
    return {("dataset", "training"): [ref, contributed], ("dataset", "holdout"): ref}


REAL_HOLDOUT = _curated("realheld")
REGRESSION = {
    **REAL_HOLDOUT,
    ("task",): "regression",
    ("validation", "labels"): [],
    ("validation", "targets"): {"min": 0.0, "max": 1.0},
}


def _config(project: Path, change: dict[tuple[str, ...], Any]) -> Path:
    config = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())
    config["project"] = "."  # brokenmodels.py beside it; the digits example comes from the test path (PYTHONPATH)
    for keys, value in change.items():
        node = config
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    path = project / f"cycle-{abs(hash(repr(change)))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(project),
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'ml.db'}",
        "PYTHONPATH": str(REPO / "examples"),
    }
    return subprocess.run([TRAINGUARD, *args], cwd=project, capture_output=True, text=True, timeout=300, env=env)


MISTAKES = {
    "missing model-signing key": ({("output", "model_signing_key"): "demo-work/keys/nope.key"}, 2, "does not exist"),
    "wrong key type": ({("output", "model_signing_key"): "demo-work/keys/wrongtype.key"}, 1, "is an ed25519 key"),
    "missing manifest": ({("dataset", "holdout", "manifest"): "demo-work/data/gone.json"}, 2, "gone.json does not"),
    "bounds that do not fit the data": ({("adversarial", "bounds"): [0.0, 0.5]}, 2, "adversarial.bounds [0, 0.5]"),
    "a regression model": ({("model",): {"class_path": "brokenmodels.Regressor"}}, 1, "returns (2, 1) for inputs"),
    "a forward that does not take the data's shape": (
        {("model",): {"class_path": "brokenmodels.WrongWidth"}},
        1,
        "brokenmodels.WrongWidth cannot take a batch of inputs shaped (2, 64)",
    ),
    "a model without validation_step": (
        {("model",): {"class_path": "brokenmodels.NoValidation"}},
        1,
        "brokenmodels.NoValidation has no validation_step",
    ),
    "a model whose forward goes on after its last Linear layer": (
        {("model",): {"class_path": "brokenmodels.Tempered"}},
        1,
        "detectors: the model's output is not the head from 'net.head.3' applied to that module's input",
    ),
    "a classification config on real-valued targets": (
        REAL_HOLDOUT,
        1,
        "task: the held-out targets do not fit: classification task: targets must be integer class labels",
    ),
    "a regression model with the wrong output width": (
        {**REGRESSION, ("model",): {"class_path": "digits_demo.models.DigitsClassifier"}},
        1,
        "returns (2, 10) for inputs shaped (2, 64); the defenses' regression loss needs outputs shaped like its "
        "targets (2,)",
    ),
    "regression targets of another shape than declared": (
        {**REGRESSION, ("validation", "targets"): {"shape": [3]}, ("model",): {"class_path": "brokenmodels.Regressor"}},
        1,
        "validation.targets.shape: the held-out targets are [] per sample, not [3]",
    ),
    "a multilabel task without its targets' schema": (
        {("task",): "multilabel", ("validation", "labels"): []},
        2,
        "validation.targets: a multilabel task needs its targets' shape and range",
    ),
    "a multilabel model on scalar targets": (
        {**REGRESSION, ("task",): "multilabel", ("validation", "targets"): {"shape": [1], "min": 0, "max": 1}},
        1,
        "validation.targets.shape: the held-out targets are [] per sample, not [1]",
    ),
    "an untrusted manifest signer": (
        {("dataset", "holdout", "trust"): "demo-work/keys/owner.pub"},
        1,
        "dataset.holdout.manifest:",
    ),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_a_config_mistake_stops_check_and_cycle_before_training_in_one_line(
    project: Path, mistake: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In process (the CLI's own `main`), to keep each case to a second; one subprocess test below covers start-up."""
    change, code, message = MISTAKES[mistake]
    config = _config(project, change)
    monkeypatch.chdir(project)
    for args in (["check", str(config)], ["cycle", "--config", str(config)]):
        with warnings.catch_warnings():
            assert main(args) == code, (args, capsys.readouterr())
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("trainguard: error:"), lines
        assert message in lines[0], lines[0]
    assert not (project / "demo-work" / "cycle").exists()  # no state (never `running`), no model, no report


def test_check_passes_a_good_config_naming_every_check(project: Path) -> None:
    """As its own process (the other checks run in this one, by the `cli` fixture)."""
    done = _run(project, "check", str(_config(project, {})))
    assert done.returncode == 0, done.stderr
    checks = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("ok ")]
    assert checks == [
        "config", "files", "keys", "keys", "manifests", "model", "rollback", "admit", "coverage", "coverage",
    ]  # fmt: skip
    assert "no anti-rollback record yet" in done.stdout and "13 shards pass" in done.stdout
    assert done.stderr == ""
    assert not (project / "demo-work" / "cycle").exists()


def test_check_passes_a_regression_config_with_real_targets(project: Path, cli: Cli) -> None:
    """A regression model (one output) on real-valued targets passes the model check under the regression loss."""
    config = _config(project, {**REGRESSION, ("model",): {"class_path": "brokenmodels.Regressor"}})
    done = cli(project, "check", str(config))
    assert done.returncode == 0, done.stderr
    assert "ok  model" in done.stdout and "regression loss and input gradient ok" in done.stdout
    assert not (project / "demo-work" / "cycle").exists()


def test_print_config_shows_the_defaults_filled_in(project: Path, cli: Cli) -> None:
    done = cli(project, "cycle", "--config", str(_config(project, {})), "--print-config")
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["trainer"]["class_path"] == "pytorch_lightning.Trainer"
    assert printed["gate"]["max_class_drop"] == 0.1 and printed["output"]["state_file"] is None


def _state_holding(project: Path, config: Path, manifest: str, version: int) -> Path:
    """A signed cycle state, as the cycle keeps it, whose anti-rollback record for `manifest`'s key set and dataset
    is at `version` (what a cycle that accepted that version leaves)."""
    from trainguard.pipeline.config import load_config
    from trainguard.pipeline.cycle_state import CycleState, Pipeline, RollbackEntry
    from trainguard.pipeline.state_log import StateStore
    from trainguard.provenance.keys import load_signing_key
    from trainguard.provenance.verify import open_manifest

    loaded = load_config(config, check_components=False)
    verified = open_manifest(project / manifest, project / "configs" / "digits-trust.yaml")
    record = RollbackEntry(
        version=version, statement_sha256=verified.statement_sha256, keyids=tuple(verified.key_set.keyids)
    )
    state_path = project / loaded.output.state_path
    key = load_signing_key(project / loaded.output.attestation_key_path)
    store = StateStore(state_path, key, loaded.pipeline_identity)
    store.update(CycleState.genesis(Pipeline.new(*loaded.pipeline_identity), rollback={verified.rollback_key: record}))
    return state_path


def test_check_reports_a_manifest_the_cycle_would_refuse_as_rollback(project: Path, cli: Cli) -> None:
    """A cycle accepted version 2 of the contributions; the version 1 in place stops the cycle, so check exits 1
    naming the manifest and `rollback`, and leaves the state as it was."""
    config = _config(project, {("output", "work_dir"): "rollback-work"})
    state = _state_holding(project, config, "demo-work/data/train.manifest.json", 2)
    before = state.read_bytes()
    done = cli(project, "check", str(config))
    assert done.returncode == 1, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "the cycle would stop" in lines[0], lines
    assert "train.manifest.json: rollback:" in lines[0]
    assert state.read_bytes() == before


def test_check_passes_a_manifest_at_the_states_version(project: Path, cli: Cli) -> None:
    config = _config(project, {("output", "work_dir"): "current-work"})
    _state_holding(project, config, "demo-work/data/train.manifest.json", 1)
    done = cli(project, "check", str(config))
    assert done.returncode == 0, done.stderr
    assert "ok  rollback   2 manifests at or past the 1 anti-rollback records" in done.stdout


def test_check_lists_the_shards_the_cycle_would_refuse_by_source_cap_and_exits_0(project: Path, cli: Cli) -> None:
    """Capped at 10% a source, each contributor loses shards: the cycle refuses them and goes on, so check says
    `refuse` for each, naming the cap, and exits 0."""
    done = cli(project, "check", str(_config(project, {("limits", "max_fraction_per_source"): 0.1})))
    assert done.returncode == 0, done.stderr
    refused = [line for line in done.stdout.splitlines() if line.startswith("refuse  limits")]
    assert refused and all("the cap is 10.0%" in line for line in refused), done.stdout
    assert f"; {len(refused)} shard(s) it would refuse" in done.stdout.splitlines()[-1]


def test_check_warns_when_the_holdout_is_too_small_for_the_gate(project: Path, cli: Cli) -> None:
    """The digits held-out set (350 rows, 27 in its smallest class) cannot resolve a 0.03 overall or 0.1 per-class
    drop: one warning each, exit 0; thresholds it can resolve draw none."""
    tight = cli(project, "check", str(_config(project, {("gate", "max_accuracy_drop"): 0.03})))
    assert tight.returncode == 0, tight.stderr
    warned = [line for line in tight.stdout.splitlines() if line.startswith("warn  gate")]
    assert len(warned) == 2, tight.stdout
    assert "too small for gate.max_accuracy_drop 0.03: 350 rows (overall)" in warned[0]
    assert "too small for gate.max_class_drop 0.1: 27 rows (class 0, the smallest)" in warned[1]
    loose = {("gate", "max_accuracy_drop"): 0.1, ("gate", "max_class_drop"): 0.4}
    done = cli(project, "check", str(_config(project, loose)))
    assert done.returncode == 0, done.stderr
    assert not [line for line in done.stdout.splitlines() if line.startswith("warn  gate")], done.stdout
    assert done.stdout.count("ok  gate") == 2


def test_check_warns_when_ronis_trusted_rows_cannot_stand_for_the_shards(project: Path, cli: Cli) -> None:
    """A tenth of the 350 held-out rows left to RONI's calibration: about 3 rows a class, too few for bootstrap draws
    to stand for fresh rows, and every contributed shard holds more of a class than 40% of them (tested on a
    subsample): one warning each, exit 0."""
    done = cli(project, "check", str(_config(project, {("roni", "calibration_fraction"): 0.1})))
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stdout.splitlines() if line.startswith("warn  roni")]
    assert len(warned) == 2, done.stdout
    assert "clean shards may be refused more often than roni.level 0.01" in warned[0]
    assert "rows support a level of about 0.2" in warned[0]  # 1 / (3 + 1) in the thinnest class, at best
    assert "tested on a seeded subsample, with less power against poison" in warned[1]


def test_check_warns_when_the_holdout_lacks_a_class(project: Path, cli: Cli) -> None:
    done = cli(project, "check", str(_config(project, _curated("nineless"))))
    assert done.returncode == 0, done.stderr
    assert "warn  coverage   the held-out set holds no row of class(es) [9]" in done.stdout
    assert "ok  coverage   the trusted base holds every class" in done.stdout


def test_check_lists_the_shards_of_a_source_the_operator_quarantined(project: Path, tmp_path: Path, cli: Cli) -> None:
    """A quarantine signed into the state (`trainguard sources quarantine`) refuses the source's shards in the
    cycle; check names each of them, with the operator's reason, and exits 0 (the cycle goes on without them)."""
    mine = shutil.copytree(project, tmp_path / "project", symlinks=True)
    config = str(_config(mine, {}))
    held = cli(mine, "sources", "--config", config, "--reason", "audit pending", "quarantine", "dave")
    assert held.returncode == 0, held.stderr
    done = cli(mine, "check", config)
    assert done.returncode == 0, done.stdout + done.stderr
    refused = [line for line in done.stdout.splitlines() if line.startswith("refuse  operator")]
    assert refused and all("(dave)" in line and "audit pending" in line for line in refused), done.stdout
    assert not [line for line in done.stdout.splitlines() if "operator" in line and "(dave)" not in line]
