"""Any supervised task: regression and multi-label models are attacked, trained, measured, gated and screened on
their own terms; a masked-input model gets its mask from the batch; what a defense cannot serve is refused in one
line before any training step."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from trainguard.defenses import TRADES, AdversarialTraining, ModelGate, RobustAccuracy, Task
from trainguard.defenses.attacks import PGD
from trainguard.defenses.errors import AttackConfigError, ModelRejectedError, ScreeningInputError, TaskMismatchError
from trainguard.defenses.heldout import LabeledData, heldout_metrics
from trainguard.defenses.margin import check_margins
from trainguard.defenses.roni import Candidate, ScreeningConfig, screen_candidates

FEATURES, LABELS = 8, 3
WEIGHTS = torch.linspace(-1.0, 1.0, FEATURES) * 2


def regression_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, FEATURES, generator=gen)
    return x, x @ WEIGHTS + 0.05 * torch.randn(n, generator=gen)


def multilabel_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, FEATURES, generator=gen)
    return x, torch.stack([x[:, 0] + x[:, 1] > 1, x[:, 2] > x[:, 3], x[:, 4:].sum(1) > 2], dim=1).float()


class Regressor(pl.LightningModule):
    """An ordinary regression module: one real output per row, MSE, logs its validation MSE."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 1))
        self.seen: list[tuple[float, float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        loss = F.mse_loss(self(x), y)
        if isinstance(batch, dict):
            with torch.no_grad():
                self.seen.append((loss.item(), F.mse_loss(self(batch["clean"]), y).item()))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/mse", F.mse_loss(self(x), y), batch_size=len(y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class MultiLabeler(pl.LightningModule):
    """An ordinary multi-label module: one logit per label, BCE-with-logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, LABELS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/bce", F.binary_cross_entropy_with_logits(self(x), y), batch_size=len(y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class MaskedClassifier(pl.LightningModule):
    """A classifier whose forward takes the input and a feature mask, reading dict batches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 2))
        self.masks: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(x * mask)

    def training_step(self, batch, batch_idx):
        self.masks.append(batch["mask"].clone())
        return F.cross_entropy(self(batch["x"], batch["mask"]), batch["y"])

    def validation_step(self, batch, batch_idx):
        correct = (self(batch["x"], batch["mask"]).argmax(1) == batch["y"]).float().mean()
        self.log("val/acc", correct, batch_size=len(batch["y"]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class MaskedRows(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, FEATURES, generator=gen)
        self.mask = torch.cat([torch.ones(n, 4), (torch.rand(n, FEATURES - 4, generator=gen) > 0.5).float()], 1)
        self.y = (self.x[:, :2].sum(1) > self.x[:, 2:4].sum(1)).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "mask": self.mask[i], "y": self.y[i]}


def masked_forward(module: nn.Module, batch: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return module(x, batch["mask"])


def fit(module: pl.LightningModule, train: DataLoader, callbacks: list, val: DataLoader | None = None, epochs=3):
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    return trainer


def loader(x: torch.Tensor, y: torch.Tensor, shuffle: bool = True) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=shuffle, generator=torch.Generator().manual_seed(0))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


# --- the task's rules, pure -------------------------------------------------------------------------------------


def test_targets_of_another_task_are_refused_in_one_line() -> None:
    with pytest.raises(TaskMismatchError) as caught:
        Task().check_targets(torch.rand(4))
    assert "classification task" in one_line(caught) and "task='regression'" in str(caught.value)
    with pytest.raises(TaskMismatchError) as caught:
        Task("regression").check_targets(torch.tensor([0, 1, 2]))
    assert "regression task" in one_line(caught) and "int64" in str(caught.value)
    with pytest.raises(TaskMismatchError) as caught:
        Task("multilabel").check_targets(torch.tensor([0.0, 1.0]))
    assert "multilabel task" in one_line(caught)
    assert caught.value.exit_code == 2 and caught.value.task == "multilabel"


def test_outputs_that_do_not_fit_the_targets_are_refused_in_one_line() -> None:
    with pytest.raises(TaskMismatchError) as caught:
        Task("regression").sample_loss(torch.zeros(4, 2), torch.zeros(4))
    assert "do not match targets" in one_line(caught)
    with pytest.raises(TaskMismatchError) as caught:
        Task().correct(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    assert "class logits" in one_line(caught)


def test_unknown_and_incomplete_tasks_are_refused_in_one_line() -> None:
    with pytest.raises(TaskMismatchError) as caught:
        Task("ranking")  # type: ignore[arg-type]
    assert "unknown task 'ranking'" in one_line(caught)
    with pytest.raises(TaskMismatchError) as caught:
        Task("custom", loss=lambda o, y: o)
    assert "both loss= and metric=" in one_line(caught)
    with pytest.raises(TaskMismatchError) as caught:
        Task("regression", tolerance=0.0)
    assert "tolerance" in one_line(caught)


def test_what_counts_as_correct_follows_the_task() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert Task().correct(logits, torch.tensor([0, 0])).tolist() == [1.0, 0.0]
    label_logits, labels = torch.tensor([[1.0, -1.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert Task("multilabel").correct(label_logits, labels).tolist() == [1.0, 0.0]
    assert Task("multilabel", multilabel_accuracy="per-label").correct(label_logits, labels).tolist() == [1.0, 0.5]
    within = Task("regression", tolerance=0.5).correct(torch.tensor([[1.4], [2.0]]), torch.tensor([1.0, 1.0]))
    assert within.tolist() == [1.0, 0.0]  # (N, 1) outputs are aligned with (N,) targets


def test_the_trivial_predictor_is_the_majority_class_label_frequencies_or_mean() -> None:
    y = torch.tensor([2, 2, 0, 2, 1])
    assert Task().trivial_outputs(y, 4).argmax(1).tolist() == [2] * 5
    assert Task("regression").trivial_outputs(torch.tensor([1.0, 3.0])).tolist() == [2.0, 2.0]
    frequencies = Task("multilabel").trivial_outputs(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])).sigmoid()
    assert torch.allclose(frequencies[0], torch.tensor([2 / 3, 1 / 3]))
    with pytest.raises(TaskMismatchError) as caught:
        Task.custom(lambda o, y: o, lambda o, y: o).trivial_outputs(torch.zeros(3))
    assert "baseline='incoming'" in one_line(caught)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["classification", "multilabel", "regression"]),
    seed=st.integers(0, 2**16),
    n=st.integers(1, 9),
)
def test_scores_are_per_sample_and_bounded(kind: str, seed: int, n: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    outputs = 10 * torch.randn(n, LABELS, generator=gen)
    targets = {
        "classification": torch.randint(0, LABELS, (n,), generator=gen),
        "multilabel": torch.randint(0, 2, (n, LABELS), generator=gen).float(),
        "regression": 10 * torch.randn(n, LABELS, generator=gen),
    }[kind]
    task = Task(kind)  # type: ignore[arg-type]
    for score in (task.correct(outputs, targets), task.soft_correct(outputs, targets)):
        assert score.shape == (n,) and bool(((score >= 0) & (score <= 1)).all())
    assert task.sample_loss(outputs, targets).shape == (n,) and bool((task.sample_loss(outputs, targets) >= 0).all())


# --- attacks and adversarial training -------------------------------------------------------------------------


def test_pgd_raises_a_regression_models_error() -> None:
    x, y = regression_data(128, seed=1)
    module = Regressor()
    fit(module, loader(*regression_data(256, seed=0)), [], epochs=5)
    task = Task("regression")
    x_adv = PGD(module, eps=0.1, steps=5, task=task, seed=0)(x, y)
    with torch.no_grad():
        assert task.sample_loss(module(x_adv), y).mean() > 2 * task.sample_loss(module(x), y).mean()


class DictRegression(Dataset):
    def __init__(self) -> None:
        self.x, self.y = regression_data(128, seed=0)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "clean": self.x[i].clone()}


def test_adversarial_training_of_a_regressor_trains_on_inputs_with_a_higher_loss() -> None:
    module = Regressor()
    callback = AdversarialTraining("pgd", eps=0.1, steps=3, task="regression", input_key="x", target_key="y", seed=0)
    val = loader(*regression_data(64, seed=2), shuffle=False)
    trainer = fit(module, DataLoader(DictRegression(), batch_size=32), [callback], val, epochs=3)
    adversarial, clean = zip(*module.seen, strict=True)
    assert sum(adversarial) > sum(clean)
    assert 0.0 <= float(trainer.callback_metrics["adv/success"]) <= 1.0


def test_robust_accuracy_of_a_regressor_is_its_within_tolerance_rate_under_attack() -> None:
    callback = RobustAccuracy((0.0, 0.2), steps=5, task=Task("regression", tolerance=0.3), max_samples=None)
    trainer = fit(Regressor(), loader(*regression_data(256, 0)), [callback], loader(*regression_data(64, 2)), epochs=5)
    clean, attacked = (float(trainer.callback_metrics[name]) for name in callback.metric_names())
    assert clean > 0.5 and attacked < clean


def test_multilabel_adversarial_training_and_robust_accuracy() -> None:
    robust = RobustAccuracy((0.0, 0.3), steps=5, task="multilabel", max_samples=None)
    adversarial = AdversarialTraining("fgsm", eps=0.05, task="multilabel", seed=0)
    data = loader(*multilabel_data(256, 0))
    trainer = fit(MultiLabeler(), data, [adversarial, robust], loader(*multilabel_data(128, 2)), epochs=4)
    clean, attacked = (float(trainer.callback_metrics[name]) for name in robust.metric_names())
    assert clean > 0.5 and attacked < clean
    assert "adv/success" in trainer.callback_metrics


@pytest.mark.parametrize(
    ("module", "data", "task"),
    [(Regressor, regression_data, "regression"), (MultiLabeler, multilabel_data, "multilabel")],
)
def test_trades_trains_regressors_and_multilabel_models(module, data, task) -> None:
    wrapper = TRADES(module(), eps=0.1, steps=2, beta=1.0, task=task, seed=0)
    trainer = fit(wrapper, loader(*data(128, 0)), [], epochs=2)
    assert float(trainer.callback_metrics["train/trades_robust"]) > 0
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_trades_refuses_a_custom_task_in_one_line() -> None:
    custom = Task.custom(lambda o, y: (o - y).abs(), lambda o, y: ((o - y).abs() < 1).float())
    with pytest.raises(TaskMismatchError) as caught:
        TRADES(Regressor(), eps=0.1, task=custom)
    assert "TRADES" in one_line(caught) and "custom task" in str(caught.value)


def test_regression_targets_with_a_classification_task_stop_the_fit_before_any_training_step() -> None:
    module = Regressor()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(TaskMismatchError) as caught:
        fit(module, loader(*regression_data(64, 0)), [AdversarialTraining("pgd", eps=0.1, steps=2)])
    assert "classification task" in one_line(caught)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize(
    "build",
    [
        lambda: AdversarialTraining("pgd", eps=0.1, bounds=None),
        lambda: RobustAccuracy(0.1, bounds=None),
        lambda: TRADES(Regressor(), eps=0.1, task="regression", bounds=None),
        lambda: PGD(nn.Linear(2, 2), eps=0.1, bounds=None),
    ],
)
def test_missing_bounds_are_refused_at_construction_naming_the_config_key(build) -> None:
    with pytest.raises(AttackConfigError) as caught:
        build()
    assert "adversarial.bounds" in one_line(caught) and "bounds=(low, high)" in str(caught.value)


# --- extra model inputs -----------------------------------------------------------------------------------------


def test_a_masked_input_model_is_attacked_measured_and_gated_with_its_mask() -> None:
    train, val, holdout = MaskedRows(256, 0), MaskedRows(64, 1), MaskedRows(128, 2)
    module = MaskedClassifier()
    adversarial = AdversarialTraining(
        "pgd", eps=0.05, steps=3, ratio=0.5, input_key="x", target_key="y", forward=masked_forward, seed=0
    )
    robust = RobustAccuracy((0.0, 0.1), steps=3, input_key="x", target_key="y", forward=masked_forward)
    gate = ModelGate(LabeledData(holdout.x, holdout.y, {"mask": holdout.mask}), forward=masked_forward)
    trainer = fit(module, DataLoader(train, batch_size=32), [adversarial, robust, gate], DataLoader(val, batch_size=32))
    assert torch.equal(torch.cat(module.masks[:8]), train.mask)  # the attack left the mask alone
    clean, attacked = (float(trainer.callback_metrics[name]) for name in robust.metric_names())
    assert clean > 0.7 and attacked <= clean
    assert "adv/success" in trainer.callback_metrics
    assert gate.verdict is not None and gate.verdict.accepted, gate.verdict
    holdout_data = LabeledData(holdout.x, holdout.y, {"mask": holdout.mask})
    assert heldout_metrics(module, holdout_data, forward=masked_forward).accuracy == gate.verdict.after.accuracy
    validated = trainer.validate(module, DataLoader(val, batch_size=32), verbose=False)[0]  # under inference mode
    assert validated[robust.metric_names()[0]] == pytest.approx(clean)


def test_a_masked_input_model_trained_by_trades_is_measured_and_gated_with_its_mask() -> None:
    """The callbacks see the TRADES wrapper: the hook calls it as it would the module, with the mask."""
    train, val, holdout = MaskedRows(256, 0), MaskedRows(64, 1), MaskedRows(128, 2)
    module = MaskedClassifier()
    wrapper = TRADES(module, eps=0.05, steps=2, beta=1.0, input_key="x", target_key="y", forward=masked_forward)
    robust = RobustAccuracy((0.0, 0.1), steps=2, input_key="x", target_key="y", forward=masked_forward)
    holdout_data = LabeledData(holdout.x, holdout.y, {"mask": holdout.mask})
    gate = ModelGate(holdout_data, forward=masked_forward)
    trainer = fit(wrapper, DataLoader(train, batch_size=32), [robust, gate], DataLoader(val, batch_size=32))
    clean, attacked = (float(trainer.callback_metrics[name]) for name in robust.metric_names())
    assert float(trainer.callback_metrics["train/trades_robust"]) > 0 and attacked <= clean
    assert gate.verdict is not None
    assert heldout_metrics(module, holdout_data, forward=masked_forward).accuracy == gate.verdict.after.accuracy


# --- the model gate ---------------------------------------------------------------------------------------------


def _classification(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, FEATURES, generator=gen)
    return x, (x[:, :4].sum(1) > x[:, 4:].sum(1)).long() + 2 * (x[:, 0] > 0.5).long()


class LuckyInit(pl.LightningModule):
    """A 4-class classifier whose random initialisation happens to answer class 3 for everything."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 4))
        with torch.no_grad():
            self.net[2].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 20.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_a_first_fit_from_scratch_is_judged_against_the_trivial_predictor_not_its_random_init() -> None:
    holdout = LabeledData(*_classification(256, 9))
    train = loader(*_classification(512, 0))
    incoming = ModelGate(holdout, raise_on_reject=False, baseline="incoming")
    fit(LuckyInit(), train, [incoming], epochs=4)
    assert incoming.verdict is not None and not incoming.verdict.accepted  # the old baseline: class 3 was "perfect"
    assert "class 3" in incoming.verdict.reason
    gate = ModelGate(holdout)
    fit(LuckyInit(), train, [gate], epochs=4)
    assert gate.verdict is not None and gate.verdict.accepted, gate.verdict
    assert "trivial predictor" in gate.verdict.reason and gate.record == gate.verdict.after


def test_a_first_fit_no_better_than_the_trivial_predictor_is_rejected_and_rolled_back() -> None:
    x, y = _classification(512, 0)
    holdout = LabeledData(*_classification(256, 9))
    module = LuckyInit()
    start = {k: v.clone() for k, v in module.state_dict().items()}
    gate = ModelGate(holdout)
    with pytest.raises(ModelRejectedError) as caught:
        fit(module, loader(x, (y + 1) % 4), [gate], epochs=4)
    assert "no better than the trivial predictor" in one_line(caught)
    assert all(torch.equal(v, start[k]) for k, v in module.state_dict().items())


def test_the_gate_judges_regressors_on_their_within_tolerance_rate() -> None:
    task = Task("regression", tolerance=0.3)
    holdout = LabeledData(*regression_data(128, 9))
    first = ModelGate(holdout, task=task)
    module = Regressor()
    fit(module, loader(*regression_data(256, 0)), [first], epochs=5)
    assert first.verdict is not None and first.verdict.accepted, first.verdict
    x, y = regression_data(256, 3)
    again = ModelGate(holdout, task=task, previous=first.record, raise_on_reject=False)
    fit(module, loader(x, y + 1.0), [again], epochs=3)  # shifted targets
    assert again.verdict is not None and not again.verdict.accepted
    assert "held-out within-0.3 rate dropped" in again.verdict.reason


def test_the_gate_refuses_targets_of_another_task_and_a_custom_task_without_baseline_in_one_line() -> None:
    with pytest.raises(TaskMismatchError) as caught:
        ModelGate(LabeledData(*regression_data(16, 0)))
    assert "classification task" in one_line(caught)
    custom = Task.custom(lambda o, y: (o - y).abs(), lambda o, y: ((o - y).abs() < 1).float())
    with pytest.raises(TaskMismatchError) as caught:
        ModelGate(LabeledData(*regression_data(16, 0)), task=custom)
    assert "custom task" in one_line(caught)


# --- RONI and the margin check ----------------------------------------------------------------------------------


def test_roni_flags_a_regression_shard_with_shifted_targets() -> None:
    x, y = regression_data(900, seed=0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 1), nn.Flatten(0))
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        optimiser.zero_grad()
        F.mse_loss(net(x[:300]), y[:300]).backward()
        optimiser.step()
    trusted, holdout = LabeledData(x[300:600], y[300:600]), LabeledData(x[600:760], y[600:760])
    shards = [LabeledData(x[760 + 35 * i : 795 + 35 * i], y[760 + 35 * i : 795 + 35 * i]) for i in range(4)]
    shards[3] = LabeledData(shards[3].x, shards[3].y + 1.5)
    candidates = [Candidate(f"shard-{i}", f"source-{i}", shard) for i, shard in enumerate(shards)]
    config = ScreeningConfig(level=0.05, calibration_draws=99, steps=10, scope="full")
    report = screen_candidates(net, trusted, holdout, candidates, config, task=Task("regression", tolerance=0.3))
    assert [d.accepted for d in report.decisions] == [True, True, True, False], [d.reason for d in report.decisions]
    assert "margin pushed down" in report.decisions[3].reason


class MaskedNet(nn.Module):
    """A plain module whose forward needs the mask: screening without it would fail."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(x * mask)


def test_roni_screens_a_masked_input_model_with_the_mask_from_the_data() -> None:
    rows = MaskedRows(900, 0)
    data = LabeledData(rows.x, rows.y, {"mask": rows.mask})
    net = MaskedNet()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        optimiser.zero_grad()
        F.cross_entropy(net(rows.x[:300], rows.mask[:300]), rows.y[:300]).backward()
        optimiser.step()
    shards = [data.take(slice(760 + 35 * i, 795 + 35 * i)) for i in range(4)]
    shards[3] = LabeledData(shards[3].x, 1 - shards[3].y, shards[3].extras)  # every label flipped
    candidates = [Candidate(f"shard-{i}", f"source-{i}", shard) for i, shard in enumerate(shards)]
    config = ScreeningConfig(level=0.05, calibration_draws=99, steps=10)
    report = screen_candidates(
        net, data.take(slice(300, 600)), data.take(slice(600, 760)), candidates, config, forward=masked_forward
    )
    assert [d.accepted for d in report.decisions] == [True, True, True, False], [d.reason for d in report.decisions]


def test_roni_refuses_targets_of_another_task_and_mismatched_extras_in_one_line() -> None:
    x, y = regression_data(64, 0)
    net = nn.Linear(FEATURES, 2)
    shard = Candidate("s", "a", LabeledData(x[:16], y[:16]))
    with pytest.raises(TaskMismatchError) as caught:
        screen_candidates(net, LabeledData(x, y), LabeledData(x, y), [shard])
    assert "classification task" in one_line(caught)
    labels = (y > 0).long()
    masked = LabeledData(x, labels, {"mask": torch.ones_like(x)})
    with pytest.raises(ScreeningInputError) as caught:
        screen_candidates(net, masked, masked, [Candidate("s", "a", LabeledData(x[:16], labels[:16]))])
    assert "same extras" in one_line(caught)


def test_the_margin_check_refuses_a_regression_task_in_one_line() -> None:
    with pytest.raises(TaskMismatchError) as caught:
        check_margins(nn.Linear(FEATURES, 1), torch.rand(20, FEATURES), ["a"] * 20, task="regression")
    assert one_line(caught) == "the margin check applies to classification tasks, not to a regression task"
