"""The FGSM-RS catastrophic-overfitting guard: a collapse of PGD accuracy stops training and restores the best epoch;
a healthy run is left alone; the guard's memory survives a resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from tests.defenses.conftest import Classifier
from trainguard.defenses import AdversarialTraining, OverfittingGuard
from trainguard.defenses.errors import AttackConfigError

EPS = 0.15


@pytest.fixture(scope="module")
def digits() -> TensorDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    return TensorDataset(x[:600], torch.tensor(bunch.target[:600], dtype=torch.long))


@pytest.fixture(scope="module")
def collapsed(digits) -> dict[str, torch.Tensor]:
    """Weights with what catastrophic overfitting leaves: clean accuracy intact, PGD accuracy near 0 (clean-trained)."""
    x, y = digits.tensors
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return copy.deepcopy(model.net.state_dict())


class PlantedCollapse(Classifier):
    """A classifier whose weights turn into `weights` at the start of epoch `at` and stop learning from then on."""

    def __init__(self, weights: dict[str, torch.Tensor] | None = None, at: int = 0) -> None:
        super().__init__()
        self.weights, self.at = weights, at

    def on_train_epoch_start(self) -> None:
        if self.weights is not None and self.current_epoch == self.at:
            self.net.load_state_dict(self.weights)
            for group in self.trainer.optimizers[0].param_groups:
                group["lr"] = 0.0


class Snapshots(pl.Callback):
    """The module's weights at the end of each epoch, before the guard looks at them (listed before the guard)."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.weights.append(copy.deepcopy(pl_module.state_dict()))


def fit(
    module: pl.LightningModule, digits, callbacks: list, max_epochs: int, ckpt_path: str | None = None, **kwargs
) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **{"enable_checkpointing": False, "devices": 1, **kwargs},
    )
    if "strategy" in kwargs:  # DDP: each rank reads its share through Lightning's DistributedSampler, in order
        loader = DataLoader(digits, batch_size=100)
    else:
        loader = DataLoader(digits, batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_collapse_of_pgd_accuracy_stops_training_and_restores_the_best_epoch(digits, collapsed) -> None:
    module = PlantedCollapse(collapsed, at=4)
    snapshots = Snapshots()
    callback = AdversarialTraining("fgsm-rs", eps=EPS, seed=0)
    with pytest.warns(UserWarning, match="catastrophic overfitting"):
        trainer = fit(module, digits, [snapshots, callback], max_epochs=7)

    guard = callback.guard
    assert guard is not None and guard.rolled_back_from == 4
    assert len(snapshots.weights) == 5, "no epoch after the collapse"
    assert guard.best_epoch is not None and guard.best_epoch < 4
    assert same_weights(module.state_dict(), snapshots.weights[guard.best_epoch])
    assert not same_weights(module.state_dict(), snapshots.weights[4])
    collapsed_acc = trainer.callback_metrics["adv/guard_acc"].item()
    assert guard.best_acc is not None and guard.best_acc - collapsed_acc > 0.2


def test_a_healthy_run_is_left_alone_and_trains_exactly_as_without_the_guard(digits) -> None:
    snapshots = Snapshots()
    guarded = AdversarialTraining("fgsm-rs", eps=EPS, seed=0)
    module = PlantedCollapse()
    trainer = fit(module, digits, [snapshots, guarded], max_epochs=4)
    assert guarded.guard is not None and guarded.guard.rolled_back_from is None
    assert len(snapshots.weights) == 4 and same_weights(module.state_dict(), snapshots.weights[-1])
    assert 0.0 <= trainer.callback_metrics["adv/guard_acc"].item() <= 1.0

    unguarded = AdversarialTraining("fgsm-rs", eps=EPS, seed=0, overfitting_guard=False)
    plain = PlantedCollapse()
    fit(plain, digits, [unguarded], max_epochs=4)
    assert unguarded.guard is None
    assert same_weights(plain.state_dict(), module.state_dict()), "the guard's PGD must not disturb training"


def test_the_guard_remembers_its_best_epoch_across_a_resume(digits, collapsed, tmp_path: Path) -> None:
    first_snapshots = Snapshots()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = AdversarialTraining("fgsm-rs", eps=EPS, seed=0)
    fit(PlantedCollapse(), digits, [first_snapshots, first, checkpoint], max_epochs=3, enable_checkpointing=True)

    # The collapse comes in the first epoch after the resume: only the checkpointed memory knows a better epoch.
    resumed = AdversarialTraining("fgsm-rs", eps=EPS, seed=0)
    module = PlantedCollapse(collapsed, at=3)
    with pytest.warns(UserWarning, match="catastrophic overfitting"):
        fit(module, digits, [resumed], max_epochs=5, ckpt_path=str(tmp_path / "last.ckpt"))
    guard = resumed.guard
    assert guard is not None and guard.rolled_back_from == 3 and guard.best_epoch in (0, 1, 2)
    assert same_weights(module.state_dict(), first_snapshots.weights[guard.best_epoch])


def test_only_fgsm_rs_is_guarded_by_default_and_bad_settings_are_refused() -> None:
    assert AdversarialTraining("fgsm-rs", eps=0.1).guard is not None
    assert AdversarialTraining("pgd", eps=0.1).guard is None
    assert AdversarialTraining("pgd", eps=0.1, overfitting_guard=True).guard is not None
    with pytest.raises(AttackConfigError, match="max_drop"):
        OverfittingGuard(eps=0.1, max_drop=0.0)
    with pytest.raises(AttackConfigError, match="max_samples"):
        OverfittingGuard(eps=0.1, max_samples=0)


def test_ddp_ranks_decide_together_and_all_roll_back(digits, collapsed) -> None:
    """Two CPU ranks (gloo) forked from this process, which has torch and Lightning imported already: a spawned rank
    would import them again (~7 CPU s each) for the same DDP fit; rank 0's weights come back as with spawn."""
    module = PlantedCollapse(collapsed, at=4)
    callback = AdversarialTraining("fgsm-rs", eps=EPS, seed=0)
    trainer = fit(module, digits, [callback], max_epochs=7, strategy="ddp_fork", devices=2)
    # Had one rank stopped alone, the other would wait forever in its next collective; the fit returned instead.
    assert trainer.callback_metrics["adv/guard_acc"].item() < 0.2, "the collapsed epoch was the last one measured"
    weights = {k.removeprefix("net."): v for k, v in module.state_dict().items()}
    assert not same_weights(weights, collapsed), "rank 0 came back with the restored weights, not the collapsed ones"
