"""A real user's first project, with nothing beyond the README: a class-per-folder PNG tree, their own CNN that logs
torchmetrics metrics, `trainguard shard` with its defaults, a curator (trusted base and held-out set), two clean
contributors who each see only some classes, and one who flips 30 % of its labels. `check`, then two cycles (each
contributor adds a batch before the second), on one process and as two gloo ranks under torchrun: every cycle
accepts both clean contributors and refuses the flipper. The commands run in this process (the CLI's own entry point,
`cli`), the keys and first shards once for both tests; under torchrun the cycles run as two gloo ranks, as the user
starts them. The wall time of each step is printed (`-s` shows it)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

BIN = Path(sys.executable).parent
CONTRIBUTORS = ("alice", "carol", "bob")
CLEAN = ("alice", "carol")
FLIPPER = "bob"

USER_MODEL = '''
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy


class PhotoNet(pl.LightningModule):
    """The user's own small CNN for 8 x 8 grayscale photos, logging torchmetrics metrics as Lightning teaches."""

    def __init__(self, channels: int = 16, lr: float = 0.005) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.head = nn.Linear(channels * 16, 10)
        self.train_acc = MulticlassAccuracy(num_classes=10)
        self.val_acc = MulticlassAccuracy(num_classes=10)

    def forward(self, x):
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.train_acc(logits, y)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return F.cross_entropy(logits, y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc.update(self(x), y)
        self.log("val/accuracy", self.val_acc, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
'''

TRUST = """signers:
  - name: curator
    keys: [keys/curator.pub]
    datasets: [photos-base, photos-holdout]
    sources: [curator]
    roles: [trusted, holdout]
  - name: alice
    keys: [keys/alice.pub]
    datasets: [photos-alice]
    sources: [alice]
  - name: carol
    keys: [keys/carol.pub]
    datasets: [photos-carol]
    sources: [carol]
  - name: bob
    keys: [keys/bob.pub]
    datasets: [photos-bob]
    sources: [bob]
"""


def _config() -> dict:
    """The README's own-model config, with the project's data: no screening, gate or detector option."""
    manifests = [("base", "photos-base"), *((who, f"photos-{who}") for who in CONTRIBUTORS)]
    return {
        "name": "photos",
        "dataset": {
            "training": [
                {"manifest": f"shards/{split}/manifest.json", "dataset": dataset, "data_dir": f"shards/{split}"}
                for split, dataset in manifests
            ],
            "holdout": {
                "manifest": "shards/holdout/manifest.json",
                "dataset": "photos-holdout",
                "data_dir": "shards/holdout",
            },
            "trust": "trust.yaml",
        },
        "data": {
            "decoders": {
                ".tar": {
                    "class_path": "trainguard.provenance.formats.webdataset.WebDatasetDecoder",
                    "init_args": {"mode": "L", "shape": [1, 8, 8]},
                }
            }
        },
        "validation": {"input_shape": [1, 8, 8], "labels": list(range(10))},
        "model": {"class_path": "mymodel.PhotoNet", "init_args": {"channels": 16, "lr": 0.005}},
        "trainer": {"init_args": {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "precision": 32}},
        "training": {"bootstrap_epochs": 15, "batch_size": 64, "seed": 0},
        "adversarial": {"attack": "pgd", "eps": 0.1, "bounds": [0.0, 1.0]},
        "output": {"work_dir": "work", "model_signing_key": "keys/model.key"},
    }


# Photos per class: the curator's base and held-out set, each clean contributor's two batches, and at most BOB of
# the rest for bob's two (a few hundred photos more change no verdict, and every rank decodes them each cycle).
BASE, HOLDOUT, OWN, BOB = 50, 40, (36, 24), 24


def _photos(root: Path) -> None:
    """sklearn's digits as PNG photos in `raw/<split>/<label>/` folders, each contributor's in two batches.
    alice sees classes 0-3 only, carol 5-7 only; bob sees every class and moves 30 % of his photos to another
    class's folder."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255).astype(np.uint8)
    rng = np.random.default_rng(7)
    order = rng.permutation(len(images))
    splits: dict[str, list[tuple[int, int]]] = {"base": [], "holdout": []}
    per_class = {c: [int(i) for i in order if digits.target[i] == c] for c in range(10)}
    for label, rows in per_class.items():
        splits["base"] += [(row, label) for row in rows[:BASE]]
        splits["holdout"] += [(row, label) for row in rows[BASE : BASE + HOLDOUT]]
        rest = rows[BASE + HOLDOUT :]
        owner = "alice" if label <= 3 else "carol" if label in (5, 6, 7) else None
        if owner is not None:
            take, rest = rest[: sum(OWN)], rest[sum(OWN) :]
            splits[f"{owner}-1"] = splits.get(f"{owner}-1", []) + [(row, label) for row in take[: OWN[0]]]
            splits[f"{owner}-2"] = splits.get(f"{owner}-2", []) + [(row, label) for row in take[OWN[0] :]]
        rest = rest[:BOB]
        for batch, rows_of in (("bob-1", rest[: len(rest) // 2]), ("bob-2", rest[len(rest) // 2 :])):
            splits[batch] = splits.get(batch, []) + [(row, label) for row in rows_of]
    for batch in ("bob-1", "bob-2"):
        rows = splits[batch]
        flipped = rng.choice(len(rows), size=round(0.3 * len(rows)), replace=False)
        for index in flipped:
            row, label = rows[index]
            rows[index] = (row, int((label + rng.integers(1, 10)) % 10))
    for split, rows in splits.items():
        for row, label in rows:
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[row], mode="L").save(folder / f"{row:04d}.png")


def _add_batch(project: Path, who: str, batch: int) -> None:
    """A contributor's photo folder `raw/<who>` grows by batch `batch`."""
    for image in (project / "raw" / f"{who}-{batch}").rglob("*.png"):
        target = project / "raw" / who / image.parent.name / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, target)


class Steps:
    """Runs the user's commands in the project folder, as they would type them, timing each: by `cli` in this
    process where it is given, else each as its own process (`launcher` starts the cycles)."""

    def __init__(
        self,
        project: Path,
        launcher: tuple[str, ...] = (),
        cli: Callable[..., subprocess.CompletedProcess[str]] | None = None,
    ) -> None:
        self.project = project
        self.launcher = launcher
        self.cli = cli
        self.times: list[tuple[str, float]] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "MLFLOW_"))}
        self.env["OMP_NUM_THREADS"] = "1"

    def run(self, *args: str, ok: bool = True, launched: bool = False) -> str:
        command = [*(self.launcher if launched else (str(BIN / "trainguard"),)), *args]
        started = time.monotonic()
        if self.cli is not None and not launched:
            done = self.cli(self.project, *args)
        else:
            done = subprocess.run(command, cwd=self.project, capture_output=True, text=True, timeout=1200, env=self.env)
        self.times.append((" ".join(args[:2]), time.monotonic() - started))
        output = done.stdout + done.stderr
        assert "Traceback" not in output, output
        if ok:
            assert done.returncode == 0, f"`trainguard {' '.join(args)}` exited {done.returncode}:\n{output}"
        return output

    def shard(self, who: str) -> str:
        """`trainguard shard` with its defaults, signed by the contributor's own key."""
        return self.run(
            *("shard", f"raw/{who}", "--out", f"shards/{who}", "--key", f"keys/{who}.key"),
            *("--dataset", f"photos-{who}", "--source", who),
        )

    def cycle(self, number: int) -> dict:
        output = self.run("cycle", "--config", "cycle.yaml", launched=bool(self.launcher), ok=False)
        assert f"cycle {number} accepted" in output, output
        return _verdicts(self.project, number)

    def report(self, title: str) -> None:
        print(f"\n{title}: " + ", ".join(f"{step} {seconds:.0f} s" for step, seconds in self.times))


def _verdicts(project: Path, number: int) -> dict[str, set[bool]]:
    """Each source's shard verdicts in cycle `number`, read from the signed cycle state: its accepted flags."""
    from trainguard.pipeline.state_log import StateStore
    from trainguard.provenance.keys import load_signing_key

    key = load_signing_key(project / "keys" / "model.key")
    state = StateStore(project / "work" / "state.json", key, ("photos", "work")).load()
    latest = state.latest
    assert latest.cycle == number, latest
    verdicts: dict[str, set[bool]] = {}
    for decision in latest.shards:
        verdicts.setdefault(decision.source, set()).add(decision.accepted)
    return verdicts


@pytest.fixture(scope="module")
def first_project(
    tmp_path_factory: pytest.TempPathFactory, setup_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> Iterator[Path]:
    """The project as the user leaves it before `check`: photos, trust policy, config, model, keys made and the first
    batch sharded and signed by `trainguard keygen` and `trainguard shard` (in this process, once for both tests)."""
    root = tmp_path_factory.mktemp("first") / "photos"
    root.mkdir()
    (root / "mymodel.py").write_text(USER_MODEL)
    (root / "trust.yaml").write_text(TRUST)
    (root / "cycle.yaml").write_text(yaml.safe_dump(_config(), sort_keys=False))
    _photos(root / "raw")
    for who in CONTRIBUTORS:
        _add_batch(root, who, 1)
    steps = Steps(root, cli=setup_cli)
    _keys_and_shards(steps)
    steps.report("keys and first shards")
    yield root


def _keys_and_shards(steps: Steps) -> None:
    for who, kind in (("curator", "ed25519"), *((who, "ed25519") for who in CONTRIBUTORS), ("model", "ecdsa-p256")):
        steps.run("keygen", "--out", f"keys/{who}", "--type", kind)
    for split, role in (("base", "trusted"), ("holdout", "holdout")):
        steps.run(
            *("shard", f"raw/{split}", "--out", f"shards/{split}", "--key", "keys/curator.key"),
            *("--dataset", f"photos-{split}", "--source", "curator", "--role", role),
        )
    for who in CONTRIBUTORS:
        steps.shard(who)


def _first_project(
    project: Path, launcher: tuple[str, ...] = (), cli: Callable[..., subprocess.CompletedProcess[str]] | None = None
) -> Steps:
    steps = Steps(project, launcher, cli)
    checked = steps.run("check", "cycle.yaml")
    assert "mymodel.PhotoNet" in checked, checked
    for number in (1, 2):
        if number == 2:
            for who in CONTRIBUTORS:
                _add_batch(project, who, 2)
                steps.shard(who)
        verdicts = steps.cycle(number)
        for who in CLEAN:
            assert verdicts.get(who) == {True}, f"cycle {number}: clean {who} refused: {verdicts}"
        assert verdicts.get(FLIPPER) == {False}, f"cycle {number}: flipper accepted: {verdicts}"
    status = steps.run("status", "--config", "cycle.yaml")
    assert "accepted model: work/models/cycle-0002" in status, status
    return steps


@pytest.fixture
def as_a_fresh_user(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process as a user's shell leaves a command run in it: no MLflow variables or process-wide URIs (the
    cycle logs to MLflow's own default store), and afterwards no trace of the user's module (`mymodel`, imported
    from the project folder the config puts on `sys.path`)."""
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(tracking, "_tracking_uri", None)
    monkeypatch.setattr(registry, "_registry_uri", None)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        yield
    finally:
        sys.modules.pop("mymodel", None)


@pytest.mark.timeout(2400)  # check, two cycles, three shards and status on two shared cores
def test_a_first_project_accepts_skewed_clean_contributors_and_refuses_the_flipper(
    first_project: Path, tmp_path: Path, as_a_fresh_user: None, cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    project = shutil.copytree(first_project, tmp_path / "photos")
    steps = _first_project(project, cli=cli)
    assert (project / "mlflow.db").is_file(), "the cycle logs to MLflow's own default store"
    steps.report("one process")


@pytest.mark.timeout(2400)
def test_a_first_project_runs_the_same_under_a_two_rank_torchrun(
    first_project: Path, tmp_path: Path, as_a_fresh_user: None, cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """The cycles run as two gloo ranks under torchrun; the commands around them (keygen, shard, check, status) in
    this process, as the plain test runs them."""
    project = shutil.copytree(first_project, tmp_path / "photos")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = (str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1")
    launcher = (*torchrun, "--master-port", str(port), "-m", "trainguard.pipeline.cli")
    steps = _first_project(project, launcher, cli)
    steps.report("torchrun, 2 gloo ranks")
