"""RobustAccuracy: accuracy per eps under PGD or an APGD ensemble on the validation set, logged through the trainer
(and to MLflow)."""

from __future__ import annotations

import mlflow
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import MLFlowLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from trainguard.defenses import RobustAccuracy
from trainguard.defenses.attacks import make_attack
from trainguard.defenses.errors import AttackConfigError


@pytest.fixture(scope="module")
def digits() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.long)
    return TensorDataset(x[:600], y[:600]), TensorDataset(x[600:800], y[600:800])


def fit(
    classifier: type[pl.LightningModule], callback: RobustAccuracy, digits, epochs: int = 3, **kwargs
) -> tuple[pl.Trainer, pl.LightningModule]:
    train, val = digits
    module = classifier()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{"logger": False, **kwargs},
    )
    trainer.fit(
        module,
        train_dataloaders=DataLoader(train, batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0)),
        val_dataloaders=DataLoader(val, batch_size=50),
    )
    return trainer, module


def independent_pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int) -> float:
    """PGD written in the test: sign steps of 2.5 eps / steps from the clean input, loss.backward on a leaf."""
    adv = x.clone()
    for _ in range(steps):
        leaf = adv.clone().requires_grad_(True)
        F.cross_entropy(model(leaf), y).backward()
        adv = torch.min(torch.max(adv + 2.5 * eps / steps * leaf.grad.sign(), x - eps), x + eps).clamp(0, 1)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        return (model(adv).argmax(1) == y).float().mean().item()


def test_robust_accuracy_is_logged_per_eps_and_is_at_least_as_strong_as_a_reference(classifier, digits) -> None:
    callback = RobustAccuracy(eps=(0.0, 0.05, 0.2), steps=5, max_samples=None)
    trainer, module = fit(classifier, callback, digits)
    metrics = trainer.callback_metrics
    at_0, at_05, at_2 = (metrics[f"val/robust_acc_eps{e}"].item() for e in ("0", "0.05", "0.2"))

    assert at_0 == pytest.approx(metrics["val/acc"].item(), abs=1e-6)
    assert at_0 > 0.7 and at_2 < at_05 < at_0
    x, y = digits[1].tensors
    module.eval()
    assert at_05 <= independent_pgd_accuracy(module, x, y, 0.05, 5) + 0.01


def test_max_samples_limits_the_evaluation_to_the_first_validation_rows(classifier, digits) -> None:
    trainer, module = fit(classifier, RobustAccuracy(eps=(0.0, 0.1), steps=2, max_samples=30), digits, epochs=1)
    x, y = digits[1].tensors
    with torch.no_grad():
        expected = (module(x[:30]).argmax(1) == y[:30]).float().mean().item()
    assert trainer.callback_metrics["val/robust_acc_eps0"].item() == pytest.approx(expected, abs=1e-6)

    during_fit = trainer.callback_metrics["val/robust_acc_eps0.1"].item()
    (standalone,) = trainer.validate(module, DataLoader(digits[1], batch_size=50), verbose=False)
    assert standalone["val/robust_acc_eps0.1"] == pytest.approx(during_fit, abs=1e-6), "same seed, same starts"


def test_robust_accuracy_reaches_mlflow_through_the_lightning_logger(classifier, digits, mlflow_uri: str) -> None:
    logger = MLFlowLogger(experiment_name="robust-accuracy", tracking_uri=mlflow_uri)
    fit(classifier, RobustAccuracy(eps=(0.1,), steps=3, max_samples=100), digits, epochs=2, logger=logger)

    history = mlflow.MlflowClient(mlflow_uri).get_metric_history(logger.run_id, "val/robust_acc_eps0.1")
    assert len(history) == 2
    assert all(0.0 <= m.value <= 1.0 for m in history)


@pytest.mark.parametrize("crafting_precision,crafted", [("trainer", torch.bfloat16), ("fp32", torch.float32)])
def test_each_eps_costs_the_attack_steps_and_one_forward_at_its_final_point(
    classifier, digits, crafting_precision, crafted
) -> None:
    module = classifier()
    calls: list[tuple[bool, torch.dtype]] = []
    module.net.register_forward_hook(
        lambda net, _i, out: None if net.training else calls.append((torch.is_grad_enabled(), out.dtype))
    )
    callback = RobustAccuracy((0.1, 0.2), steps=3, max_samples=None, crafting_precision=crafting_precision)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", precision="bf16-mixed", callbacks=[callback], logger=False,
                         num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    train, val = digits
    trainer.fit(module, DataLoader(train, batch_size=100), DataLoader(val, batch_size=50))

    batches, eps_count = 4, 2
    crafting_calls = [dtype for grad, dtype in calls if grad]
    assert len(crafting_calls) == batches * eps_count * 3 and set(crafting_calls) == {crafted}
    no_grad_calls = [dtype for grad, dtype in calls if not grad]
    assert len(no_grad_calls) == batches * (1 + eps_count), "validation_step's forward plus one per eps, no more"
    assert 0.0 <= trainer.callback_metrics["val/robust_acc_eps0.2"] <= trainer.callback_metrics["val/robust_acc_eps0.1"]


def test_the_ensemble_logs_the_per_sample_worst_case_and_each_attacks_own_accuracy(classifier, digits) -> None:
    attacks = ("pgd", "apgd-ce", "apgd-dlr")
    callback = RobustAccuracy(eps=(0.05, 0.1), attacks=attacks, steps=10, restarts=2, max_samples=None)
    trainer, module = fit(classifier, callback, digits, epochs=2)
    metrics = trainer.callback_metrics

    # Recomputed outside the callback: same attacks, seeds and batches, in the same order.
    module.eval()
    fresh = {a: make_attack(a, module, eps=0.1, steps=10, restarts=2, seed=0) for a in attacks}
    per_row: dict[tuple[float, str], list[torch.Tensor]] = {(e, a): [] for e in (0.05, 0.1) for a in attacks}
    for x, y in DataLoader(digits[1], batch_size=50):
        for eps in (0.05, 0.1):
            for a, attack in fresh.items():
                per_row[eps, a].append(attack.predict(attack(x, y, eps=eps)).argmax(1) == y)
    for eps in (0.05, 0.1):
        correct = {a: torch.cat(per_row[eps, a]) for a in attacks}
        worst = torch.stack(list(correct.values())).all(0).float().mean().item()
        assert metrics[f"val/robust_acc_eps{eps:g}"].item() == pytest.approx(worst, abs=1e-6)
        for a in attacks:
            own = metrics[f"val/robust_acc_eps{eps:g}/{a}"].item()
            assert own == pytest.approx(correct[a].float().mean().item(), abs=1e-6)
            assert worst <= own
    assert worst < min(correct[a].float().mean().item() for a in attacks), "the attacks break different rows"


def test_a_single_attack_keeps_the_metric_names_of_pgd_alone(classifier, digits) -> None:
    callback = RobustAccuracy(eps=(0.1,), attacks=("apgd-ce",), steps=5, max_samples=100)
    trainer, _ = fit(classifier, callback, digits, epochs=1)
    assert callback.attack_metric_names() == {}
    assert [k for k in trainer.callback_metrics if k.startswith("val/robust")] == ["val/robust_acc_eps0.1"]


def test_unusable_settings_are_refused() -> None:
    with pytest.raises(AttackConfigError, match="eps"):
        RobustAccuracy(eps=(-0.1,))
    with pytest.raises(AttackConfigError, match="max_samples"):
        RobustAccuracy(eps=0.1, max_samples=0)
    for attacks in (("cw",), ("pgd", "pgd"), ()):
        with pytest.raises(AttackConfigError, match="attacks must be distinct names"):
            RobustAccuracy(eps=0.1, attacks=attacks)
    with pytest.raises(AttackConfigError, match="restarts"):
        RobustAccuracy(eps=0.1, attacks=("apgd-ce",), restarts=0)
