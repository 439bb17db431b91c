"""TRADES as a wrapper: an unmodified module trains on the TRADES objective and keeps its own validation logging."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from trainguard.defenses import TRADES
from trainguard.defenses.errors import AttackConfigError
from trainguard.defenses.trades import TradesAttack


@pytest.fixture(scope="module")
def digits() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.long)
    return TensorDataset(x[:500], y[:500]), TensorDataset(x[500:700], y[500:700])


def fit(module: pl.LightningModule, digits, epochs: int) -> pl.Trainer:
    train, val = digits
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(train, batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=DataLoader(val, batch_size=100))
    return trainer


def kl(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor) -> float:
    with torch.no_grad():
        return F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1), reduction="batchmean").item()


def test_the_wrapped_module_trains_on_the_trades_objective_and_keeps_its_validation(
    classifier, digits, tmp_path
) -> None:
    inner = classifier()
    before = [p.detach().clone() for p in inner.parameters()]
    wrapper = TRADES(inner, eps=0.1, beta=6.0, steps=3, seed=0)
    trainer = fit(wrapper, digits, epochs=3)
    metrics = trainer.callback_metrics

    assert metrics["train/trades_robust"] > 0
    assert metrics["train/loss"].item() == pytest.approx(
        metrics["train/trades_natural"].item() + 6.0 * metrics["train/trades_robust"].item(), rel=1e-4
    )
    assert metrics["val/acc"] > 0.6, "the wrapped module's own validation_step and self.log still run"
    assert any(not torch.equal(a, b) for a, b in zip(before, inner.parameters(), strict=True))

    trainer.save_checkpoint(tmp_path / "trades.ckpt")
    restored = TRADES(classifier(), eps=0.1, seed=1)
    restored.on_load_checkpoint(torch.load(tmp_path / "trades.ckpt", weights_only=True))
    assert torch.equal(restored.attack.state_dict()["generator"], wrapper.attack.state_dict()["generator"])


def test_trades_attack_raises_the_divergence_within_eps_and_bounds(digits) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    x, y = digits[0].tensors
    x = x[:100]
    adv = TradesAttack(model, eps=0.1, steps=5, seed=0)(x, y[:100])
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    noise = (x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) * 2 - 1) * 0.1).clamp(0, 1)
    assert kl(model, x, adv) > 2 * kl(model, x, noise)


def test_trades_is_more_robust_than_clean_training(classifier, digits) -> None:
    clean = classifier()
    fit(clean, digits, epochs=4)
    trades = TRADES(classifier(), eps=0.15, beta=6.0, steps=3, seed=0)
    fit(trades, digits, epochs=4)
    x, y = digits[1].tensors

    def robust(model: nn.Module) -> float:
        from trainguard.defenses.attacks import PGD

        model.eval()
        adv = PGD(model, eps=0.15, steps=10, seed=0)(x, y)
        with torch.no_grad():
            return (model(adv).argmax(1) == y).float().mean().item()

    assert robust(trades.module) > robust(clean) + 0.1


@pytest.mark.parametrize("crafting_precision,crafted", [("trainer", torch.bfloat16), ("fp32", torch.float32)])
def test_a_trades_step_costs_the_clean_forward_the_attack_steps_and_the_adversarial_forward(
    classifier, digits, crafting_precision, crafted
) -> None:
    inner = classifier()
    calls: list[tuple[bool, torch.dtype]] = []
    inner.net.register_forward_hook(lambda net, _i, out: calls.append((net.training, out.dtype)))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", precision="bf16-mixed", logger=False, limit_val_batches=0,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    train, _ = digits
    trainer.fit(
        TRADES(inner, eps=0.1, steps=4, seed=0, crafting_precision=crafting_precision),
        DataLoader(train, batch_size=100),
    )

    batches = 5
    assert [dtype for training, dtype in calls if training] == [torch.bfloat16] * 2 * batches
    assert [dtype for training, dtype in calls if not training] == [crafted] * 4 * batches
    assert torch.isfinite(trainer.callback_metrics["train/trades_robust"])
    assert trainer.callback_metrics["train/trades_robust"] > 0


def test_the_trades_attack_given_labels_targets_the_models_own_clean_distribution(digits) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    x, y = digits[0].tensors
    with torch.no_grad():
        probs = F.softmax(model(x[:50]), dim=1)
    from_labels = TradesAttack(model, eps=0.1, steps=3, seed=0)(x[:50], y[:50])
    assert torch.equal(TradesAttack(model, eps=0.1, steps=3, seed=0)(x[:50], probs), from_labels)


def test_negative_beta_is_refused(classifier) -> None:
    with pytest.raises(AttackConfigError, match="beta"):
        TRADES(classifier(), eps=0.1, beta=-1.0)
