"""A new user's first hour, scripted through the `trainguard` CLI in a fresh project folder: their own
LightningModule, their own images sharded and signed, the config checked, a cycle run (two for the images
project), the accepted model loaded back through its signature. Every command's output must be trainguard's alone:
no traceback, no third-party chatter. Projects are parametrized, so other tasks (tabular regression, a
masked-input model) add a `Project` with their model and data. The image project starts every command as its own
process, as the user types it. The others add their model, task and decoder to `check` and `cycle`, which run in this
process (`cli`; a process of their own would spend 5-7 CPU s importing Lightning), their output checked with what their
own process would print beyond stdout and stderr (the root logger's handler, the warnings let through); a command the
image project does not start (`shard --from-csv`) starts as its own process."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

TRAINGUARD = str(Path(sys.executable).parent / "trainguard")
CHATTER = (
    "Traceback",
    "GPU available",
    "TPU available",
    "litlogger",
    "Warning",
    "deprecated",
    "val_dataloader",
    "Replacing",
    "mlflow.",
    "INFO",
    "not writable",
    "View run",
    "Downloading artifacts",
)

IMAGE_MODEL = '''
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F


class TinyDigitNet(pl.LightningModule):
    """A user's own image classifier: (N, 1, 8, 8) grayscale digits, ten classes."""

    def __init__(self, hidden: int = 64, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x):
        return self.net(x.reshape(-1, 1, 8, 8))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
'''


@dataclass(frozen=True)
class Project:
    """A user's project: its model module, how it writes its raw data and shards each split (`base`, `holdout`,
    `alice`; `bob` for a second cycle), the config sections that differ, an input the loaded champion predicts on,
    and which commands start as their own process."""

    name: str
    model_source: str
    class_path: str
    write_data: Callable[[Path], None]
    config: dict
    shard: Callable[[str, str, int], tuple[str, ...]]
    example: Callable[[], np.ndarray]
    predicted: tuple[str, ...]
    margin_check: bool = True
    second_cycle: bool = False  # the state across cycles is the same for every task: one project proves it
    # The commands started as their own process (None: every one); the others run in this process (`cli`). A `cycle`
    # of its own costs ~10 CPU s more than one here, most of it imports.
    fresh: frozenset[str] | None = frozenset()


def _image_shard(split: str, out: str, size: int) -> tuple[str, ...]:
    return ("shard", f"raw/{split}", "--out", out, "--shard-size", str(size))


def _digit_images(root: Path) -> None:
    """sklearn's digits as PNG files in <split>/<label>/ folders, as a user's image folder would be."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    splits = {"base": order[:300], "holdout": order[300:500], "alice": order[500:600], "bob": order[600:700]}
    for split, rows in splits.items():
        for row in rows:
            folder = root / split / str(digits.target[row])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[row], mode="L").save(folder / f"{row:04d}.png")


IMAGES = Project(
    name="image-classification",
    model_source=IMAGE_MODEL,
    class_path="mymodel.TinyDigitNet",
    write_data=_digit_images,
    config={
        "data": {
            "decoders": {
                ".tar": {
                    "class_path": "trainguard.provenance.formats.webdataset.WebDatasetDecoder",
                    "init_args": {"mode": "L", "shape": [1, 8, 8]},
                }
            }
        },
        "validation": {"input_shape": [1, 8, 8], "labels": list(range(10)), "min_rows": 10},
    },
    shard=_image_shard,
    example=lambda: np.zeros((3, 1, 8, 8), np.float32),
    predicted=("label", "probability"),
    second_cycle=True,
    fresh=None,
)

TABULAR_MODEL = '''
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F


class TabRegressor(pl.LightningModule):
    """A user's own tabular regressor: six features in [0, 1] to one real target."""

    def __init__(self, features: int = 6, hidden: int = 32, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
'''


def _tabular_rows(root: Path) -> None:
    """A user's CSV tables: six features in [0, 1] and a real target `price`, one table per split."""
    import pandas as pd

    rng = np.random.default_rng(0)
    weights = np.array([1.0, -0.5, 0.8, 0.3, 0.0, 0.6])
    root.mkdir(parents=True)
    for split, rows in {"base": 200, "holdout": 200, "alice": 100}.items():
        x = rng.random((rows, 6)).astype(np.float32)
        price = x @ weights + 0.05 * rng.standard_normal(rows)
        frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(6)]).assign(price=price.astype(np.float32))
        frame.to_csv(root / f"{split}.csv", index=False)


TABULAR = Project(
    name="tabular-regression",
    model_source=TABULAR_MODEL,
    class_path="mymodel.TabRegressor",
    write_data=_tabular_rows,
    config={
        "task": {"kind": "regression", "tolerance": 0.3},
        "validation": {"label_column": "price", "targets": {"min": -2.0, "max": 4.0}, "min_rows": 10},
    },
    shard=lambda split, out, size: (
        "shard",
        "--from-csv",
        f"raw/{split}.csv",
        "--label-column",
        "price",
        "--out",
        out,
        "--shard-size",
        str(size),
    ),
    example=lambda: np.full((3, 6), 0.5, np.float32),
    predicted=("output",),
    margin_check=False,  # class margins: classification only
    fresh=frozenset({"shard"}),
)

MASKED_MODEL = '''
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from trainguard.defenses import batch_input


class MaskedDigitNet(pl.LightningModule):
    """A user's own classifier of partly hidden digits: forward(image, mask) sees only the pixels the mask shows."""

    def __init__(self, hidden: int = 64, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, image, mask):
        return self.net(torch.cat([image * mask, mask], 1))

    def training_step(self, batch, batch_idx):
        x, y = batch  # the signed PNGs' gray channel and their alpha mask
        loss = F.cross_entropy(self(x[:, :1], x[:, 1:]), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x[:, :1], x[:, 1:]), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def masked_forward(module, batch, x):
    """The defenses' view: the pixels they may perturb from `x`, the mask from the clean batch."""
    return module(x[:, :1], batch_input(batch)[:, 1:])
'''


def _masked_digit_images(root: Path) -> None:
    """The digits with a hidden 3 x 3 patch each, as gray + alpha PNGs (alpha 0 where hidden), in class folders."""
    from PIL import Image

    _digit_images(root)
    rng = np.random.default_rng(1)
    for path in sorted(root.glob("*/*/*.png")):
        alpha = np.full((8, 8), 255, np.uint8)
        top, left = rng.integers(0, 6, size=2)
        alpha[top : top + 3, left : left + 3] = 0
        gray = np.asarray(Image.open(path).convert("L"))
        Image.fromarray(np.stack([gray, alpha], -1), mode="LA").save(path)


MASKED = Project(
    name="masked-image-classification",
    model_source=MASKED_MODEL,
    class_path="mymodel.MaskedDigitNet",
    write_data=_masked_digit_images,
    config={
        "model_forward": "mymodel.masked_forward",
        "data": {
            "decoders": {
                ".tar": {
                    "class_path": "trainguard.provenance.formats.webdataset.WebDatasetDecoder",
                    "init_args": {"mode": "LA", "shape": [2, 8, 8]},
                }
            }
        },
        "validation": {"input_shape": [2, 8, 8], "labels": list(range(10)), "min_rows": 10},
    },
    shard=_image_shard,
    example=lambda: np.ones((3, 2, 8, 8), np.float32),
    predicted=("label", "probability"),
    margin_check=False,  # margins call the model on its inputs alone
)

TRUST = """signers:
  - name: curator
    keys: [keys/curator.pub]
    datasets: [digits-trusted]
    sources: [curator]
    roles: [trusted, holdout]
  - name: owner
    keys: [keys/owner.pub]
    datasets: [digits-contributed]
    sources: [alice, bob]
    roles: [train]
"""


def _config(project: Project) -> dict:
    return {
        "name": "first-hour",
        "dataset": {
            "training": [
                {"manifest": "data/trusted.manifest.json", "dataset": "digits-trusted", "data_dir": "data/trusted"},
                {"manifest": "data/train.manifest.json", "dataset": "digits-contributed", "data_dir": "data/train"},
            ],
            "holdout": {
                "manifest": "data/trusted.manifest.json",
                "dataset": "digits-trusted",
                "data_dir": "data/trusted",
            },
            "trust": "trust.yaml",
        },
        **project.config,
        # Every stage at a small cost: the fewest draws level 0.05 allows (draws + 1 >= 4 / level), and three rates
        # for the "auto" rate probe (120 copies each, which fine-tune every parameter of the masked model).
        "roni": {
            "options": {"steps": 3, "checkpoints": 2, "lr_grid": [0.1, 0.02, 0.005]},
            "calibration_draws": 79,
            "level": 0.05,
        },
        "adversarial": {"attack": "fgsm", "eps": 0.1},
        "robust_eval": {"eps": [0.0, 0.1], "subset_size": 32, "steps": 1},
        "limits": {"max_fraction_per_source": 0.9},
        "gate": {"min_clean_accuracy": 0.3, "max_accuracy_drop": 0.5, "max_class_drop": 1.0},
        "training": {"bootstrap_epochs": 8, "batch_size": 64},
        "trainer": {"init_args": {"max_epochs": 1, "accelerator": "cpu", "devices": 1}},
        "model": {"class_path": project.class_path, "init_args": {"lr": 0.005}},
        "output": {"work_dir": "work", "model_signing_key": "keys/model.key"},
        "tracking": {"experiment_name": f"first-hour-{project.name}", "registered_model_name": project.name},
    }


Cli = Callable[..., subprocess.CompletedProcess[str]]


def _trainguard(project_dir: Path, *args: str, ok: bool = True, cli: Cli | None = None) -> str:
    """Runs one CLI command in the project as a user would (its own process, no PYTHONPATH), or in this process
    where `cli` is given, returning stdout + stderr after checking it holds nothing but trainguard's own lines."""
    if cli is not None:
        # What its own process would print besides its stdout and stderr: the root logger's stream handler (which
        # quiet_console adds where the root has none, here beside pytest's, and sets to ERROR as it does every root
        # handler) and the warnings its filters let through.
        logged = io.StringIO()
        handler = logging.StreamHandler(logged)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        try:
            with warnings.catch_warnings(record=True) as shown:
                done = cli(project_dir, *args)
        finally:
            logging.getLogger().removeHandler(handler)
        printed = [warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in shown]
        done.stderr += logged.getvalue() + "".join(printed)
    else:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run(
            [TRAINGUARD, *args], cwd=project_dir, capture_output=True, text=True, timeout=600, env=env
        )
    output = done.stdout + done.stderr
    for noise in CHATTER:
        assert noise not in output, f"`trainguard {' '.join(args)}` printed {noise!r}:\n{output}"
    if ok:
        assert done.returncode == 0, f"`trainguard {' '.join(args)}` exited {done.returncode}:\n{output}"
    return output


@pytest.fixture
def own_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`sys.path` put back after the test (a `check` or `cycle` in this process puts the project on it, as does the
    user's serving code) and no user module `mymodel` left imported for the next project's."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        yield
    finally:
        sys.modules.pop("mymodel", None)


@pytest.mark.timeout(900)  # a dozen CLI commands and two cycles, each its own process
@pytest.mark.parametrize("project", [IMAGES, TABULAR, MASKED], ids=lambda p: p.name)
def test_a_new_project_signs_checks_runs_its_cycles_and_loads_its_model(
    tmp_path: Path, project: Project, mlflow_uri: str, cli: Cli, own_module: None
) -> None:
    root = tmp_path / "myproject"
    root.mkdir()
    (root / "mymodel.py").write_text(project.model_source)
    project.write_data(root / "raw")
    (root / "trust.yaml").write_text(TRUST)
    (root / "cycle.yaml").write_text(yaml.safe_dump(_config(project)))

    def trainguard(*args: str, ok: bool = True) -> str:
        fresh = project.fresh is None or args[0] in project.fresh
        return _trainguard(root, *args, ok=ok, cli=None if fresh else cli)

    for name, kind in (("curator", "ed25519"), ("owner", "ed25519"), ("model", "ecdsa-p256")):
        trainguard("keygen", "--out", f"keys/{name}", "--type", kind)
    for split in ("base", "holdout"):
        trainguard(*project.shard(split, f"data/trusted/{split}", 100))
    trainguard(*project.shard("alice", "data/train/alice", 50))
    roles = json.dumps({"holdout/*": "holdout"})
    trainguard(
        "sign",
        "data/trusted",
        "--key",
        "keys/curator.key",
        "--out",
        "data/trusted.manifest.json",
        "--dataset",
        "digits-trusted",
        "--source",
        "curator",
        "--role",
        "trusted",
        "--roles",
        roles,
    )
    sign_train = (
        "sign",
        "data/train",
        "--key",
        "keys/owner.key",
        "--out",
        "data/train.manifest.json",
        "--dataset",
        "digits-contributed",
        "--sources",
        json.dumps({"alice/": "alice", "bob/": "bob"}),
    )
    trainguard(*sign_train)

    checked = trainguard("check", "cycle.yaml")
    assert "ok  model" in checked and project.class_path in checked, checked
    first = trainguard("cycle", "--config", "cycle.yaml")
    assert "cycle 1 accepted" in first, first
    report = json.loads((root / "work" / "reports" / "cycle-0001.json").read_text())
    margin = report["roni"]["margin"]
    assert isinstance(margin, list) if project.margin_check else margin.startswith("skipped: "), margin
    assert report["task"]["kind"] == project.config.get("task", {}).get("kind", "classification")

    if project.second_cycle:
        trainguard(*project.shard("bob", "data/train/bob", 50))
        trainguard(*sign_train)
        second = trainguard("cycle", "--config", "cycle.yaml", ok=False)
        assert "cycle 2 " in second and "state" in second
        history = trainguard("history", "--config", "cycle.yaml")
        assert "cycle 2:" in history
    status = trainguard("status", "--config", "cycle.yaml")
    assert "work/state.json" in status and "work/models/cycle-0001" in status

    sys.path.insert(0, str(root))  # the user's own module, as their serving code would import it
    import trainguard

    champion = trainguard.load_model(project.name, key=root / "keys" / "model.pub")
    predictions = champion.predict(project.example())
    assert tuple(predictions.columns) == project.predicted and len(predictions) == 3
    assert np.isfinite(predictions.to_numpy(np.float64)).all()
