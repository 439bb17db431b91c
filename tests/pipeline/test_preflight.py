"""Every mistake a new user makes in a cycle config is found before any training, by `trainguard check` and at
the start of `trainguard cycle`: one line, exit 2 for bad input / 1 for a failed check, and nothing left behind
(no state, no model)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from digits_demo.demo import create_keys, sign_contributions, sign_trusted
from digits_demo.prepare import prepare_digits

from trainguard.pipeline.cli import main
from trainguard.provenance.keys import generate_signing_key, write_keypair

REPO = Path(__file__).resolve().parents[2]
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
    _sign_real_targets(data, keys)
    return root


def _sign_real_targets(data: Path, keys: Path) -> None:
    """The held-out rows with real-valued targets (label / 9), signed by the curator as `realheld/`: data for a
    regression task, or for a classification config that does not fit it."""
    import numpy as np
    import pandas as pd

    from trainguard.provenance.keys import load_signing_key
    from trainguard.provenance.signing import sign_dataset, write_manifest

    frame = pd.read_parquet(data / "trusted" / "holdout.parquet")
    (data / "realheld").mkdir()
    frame.assign(label=(frame["label"] / 9).astype(np.float32)).to_parquet(data / "realheld" / "holdout.parquet")
    envelope, _ = sign_dataset(
        data / "realheld",
        load_signing_key(keys / "curator.key"),
        dataset="digits-trusted",
        source="curator",
        roles={"holdout.*": "holdout"},
    )
    write_manifest(envelope, data / "realheld.manifest.json")


REAL_HOLDOUT = {
    ("dataset", "holdout"): {
        "manifest": "demo-work/data/realheld.manifest.json",
        "dataset": "digits-trusted",
        "data_dir": "demo-work/data/realheld",
    }
}
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
    """In process (the CLI's own `main`), to keep each case to a second; the subprocess tests below cover start-up."""
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
    done = _run(project, "check", str(_config(project, {})))
    assert done.returncode == 0, done.stderr
    checks = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("ok ")]
    assert checks == ["config", "files", "keys", "keys", "manifests", "model"]
    assert done.stderr == ""
    assert not (project / "demo-work" / "cycle").exists()


def test_check_passes_a_regression_config_with_real_targets(project: Path) -> None:
    """A regression model (one output) on real-valued targets passes the model check under the regression loss."""
    config = _config(project, {**REGRESSION, ("model",): {"class_path": "brokenmodels.Regressor"}})
    done = _run(project, "check", str(config))
    assert done.returncode == 0, done.stderr
    assert "ok  model" in done.stdout and "regression loss and input gradient ok" in done.stdout
    assert not (project / "demo-work" / "cycle").exists()


def test_print_config_shows_the_defaults_filled_in(project: Path) -> None:
    done = _run(project, "cycle", "--config", str(_config(project, {})), "--print-config")
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["trainer"]["class_path"] == "pytorch_lightning.Trainer"
    assert printed["gate"]["max_class_drop"] == 0.1 and printed["output"]["state_file"] is None
