"""AutoAttack's cascade: only the rows still robust go on to the next attack, each attack's cost is counted, and the
presets run as a cascade in RobustAccuracy with the gradient-masking flags."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from trainguard.defenses import RobustAccuracy
from trainguard.defenses.attacks import PGD, make_attack
from trainguard.defenses.attacks.cascade import Cascade
from trainguard.defenses.errors import AttackConfigError
from trainguard.defenses.masking import MaskingCheck, large_eps, more_than_a_few


class RecordingPGD(PGD):
    """PGD that keeps the rows it was asked to attack (the inputs of each call)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.received: list[torch.Tensor] = []

    def _perturb(self, x, y, eps, lower, upper):  # type: ignore[no-untyped-def]
        self.received.append(x.clone())
        return super()._perturb(x, y, eps, lower, upper)


@pytest.fixture(scope="module")
def digits() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.long)
    return TensorDataset(x[:600], y[:600]), TensorDataset(x[600:800], y[600:800])


@pytest.fixture(scope="module")
def mlp(digits) -> nn.Module:
    train, _ = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = train.tensors
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_each_attack_receives_only_the_rows_every_earlier_attack_left_correct(mlp, digits) -> None:
    x, y = digits[1].tensors
    first, second = RecordingPGD(mlp, eps=0.05, steps=1, seed=0), RecordingPGD(mlp, eps=0.05, steps=10, seed=1)
    third = make_attack("apgd-t", mlp, eps=0.05, steps=4, seed=2)
    result = Cascade({"pgd-a": first, "pgd-b": second, "apgd-t": third})(x, y, 0.05)

    with torch.no_grad():
        clean = mlp(x).argmax(1) == y
    assert torch.equal(result.clean, clean) and (~clean).sum() > 0
    assert torch.equal(first.received[0], x[clean]), "the first attack gets the clean-correct rows only"
    after_first = clean & ~result.broken_by["pgd-a"]
    assert result.broken_by["pgd-a"].sum() > 0 and result.broken_by["pgd-b"].sum() > 0
    assert torch.equal(second.received[0], x[after_first])
    assert result.costs["apgd-t"].rows == int((after_first & ~result.broken_by["pgd-b"]).sum())
    # Every row ends as a clean error, broken by exactly one attack, or robust.
    outcome = torch.stack([~clean, *result.broken_by.values(), result.robust]).long()
    assert torch.equal(outcome.sum(0), torch.ones(len(y), dtype=torch.long))


def test_the_cost_counts_each_attacks_gradient_and_forward_rows(mlp, digits) -> None:
    x, y = digits[1].tensors
    result = Cascade({"pgd": PGD(mlp, eps=0.3, steps=5, seed=0), "apgd-ce": make_attack("apgd-ce", mlp, eps=0.3)})(
        x, y, 0.3
    )
    pgd = result.costs["pgd"]
    assert pgd.gradients == 5 * pgd.rows and pgd.forwards == pgd.rows, "5 steps, then one forward at the end"
    assert result.costs["apgd-ce"].rows == int((result.clean & ~result.broken_by["pgd"]).sum())
    assert pgd.seconds > 0


def test_a_later_attack_is_not_run_once_no_row_is_left(mlp, digits) -> None:
    x, y = digits[1].tensors
    second = RecordingPGD(mlp, eps=0.5, steps=2)
    result = Cascade({"apgd-ce": make_attack("apgd-ce", mlp, eps=0.5, steps=20, seed=0), "pgd": second})(x, y, 0.5)
    assert not result.robust.any() and second.received == [] and result.costs["pgd"].gradients == 0


class Quantised(pl.LightningModule):
    """The digits MLP behind a rounding layer: its input gradient is zero almost everywhere (masked gradients)."""

    def __init__(self, levels: int | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.levels = levels
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x if self.levels is None else torch.round(x * self.levels) / self.levels)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean(), on_epoch=True, batch_size=len(y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def fit(module: pl.LightningModule, callback: RobustAccuracy, digits) -> pl.Trainer:
    train, val = digits
    trainer = pl.Trainer(
        max_epochs=2,
        check_val_every_n_epoch=2,
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(
        module,
        train_dataloaders=DataLoader(train, batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0)),
        val_dataloaders=DataLoader(val, batch_size=100),
    )
    return trainer


def test_the_fast_preset_runs_as_a_cascade_and_logs_what_each_attack_broke_and_cost(digits) -> None:
    callback = RobustAccuracy(eps=(0.0, 0.1), attacks="autoattack-fast", steps=10, max_samples=100)
    metrics = fit(Quantised(None), callback, digits).callback_metrics
    assert callback.attack_names == ("apgd-ce", "apgd-t") and callback.preset == "autoattack-fast"
    worst = metrics["val/robust_acc_eps0.1"].item()
    broken = [metrics[f"val/robust_acc_eps0.1/broken_by/{a}"].item() for a in ("apgd-ce", "apgd-t")]
    clean = metrics["val/robust_acc_eps0"].item()
    assert worst + sum(broken) == pytest.approx(clean, abs=1e-6) and broken[0] > 0
    assert callback.costs["apgd-ce"].rows > callback.costs["apgd-t"].rows > 0
    assert metrics["val/robust_cost/apgd-t/gradients"].item() == callback.costs["apgd-t"].gradients
    assert metrics["val/gradient_masking"].item() == 0 and metrics["val/robust_acc_large_eps"].item() == 0
    assert callback.masking is not None and not callback.masking.flagged


def test_a_model_with_masked_gradients_is_flagged(digits) -> None:
    callback = RobustAccuracy(eps=(0.1,), attacks="autoattack-fast", steps=3, max_samples=100)
    metrics = fit(Quantised(2), callback, digits).callback_metrics
    assert metrics["val/gradient_masking"].item() == 1 and metrics["val/gradient_masking/large_eps"].item() == 1
    assert callback.masking is not None and callback.masking.large_eps == 0.5
    assert "half the bounds' range" in callback.masking.reasons()[0]


def test_square_breaking_rows_the_white_box_attacks_left_robust_is_flagged(digits) -> None:
    # 4 steps: APGD and FAB iterations, and 200 Square queries; enough for Square on a model the gradients mislead.
    callback = RobustAccuracy(eps=(0.2,), attacks="autoattack", steps=4, max_samples=100, large_eps_check=False)
    metrics = fit(Quantised(2), callback, digits).callback_metrics
    square = metrics["val/robust_acc_eps0.2/broken_by/square"].item()
    assert square > 0.03 and metrics["val/gradient_masking/black_box"].item() == 1
    assert callback.masking is not None and "Square broke" in callback.masking.reasons()[0]
    assert callback.costs["square"].gradients == 0 and callback.costs["square"].forwards > 0


@pytest.mark.parametrize("count,rows,flag", [(2, 100, False), (3, 100, True), (3, 400, False), (5, 400, True)])
def test_more_than_a_few_means_over_one_percent_and_at_least_three_rows(count, rows, flag) -> None:
    assert more_than_a_few(count, rows) is flag
    check = MaskingCheck(rows=rows, black_box_rows=count, large_eps=0.5, large_eps_robust_rows=0)
    assert check.flagged is flag and check.black_box is flag and not check.large_eps_robust


def test_the_large_eps_is_half_the_widest_range_in_linf_and_the_half_ranges_norm_in_l2() -> None:
    x = torch.zeros(2, 4)
    lower, upper = torch.tensor([0.0, 0.0, -1.0, 0.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert large_eps(lower, upper, x, "inf") == 1.0
    assert large_eps(lower, upper, x, "2") == pytest.approx((0.25 * 3 + 1) ** 0.5)


def test_a_misspelt_preset_is_refused_with_the_presets_named() -> None:
    with pytest.raises(AttackConfigError, match="preset among autoattack, autoattack-fast"):
        RobustAccuracy(eps=0.1, attacks="autoattak")
