"""ModelGate with real Lightning Trainers: bad retraining is rejected and rolled back, good retraining accepted."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from digits_demo.digits import load_digits_split
from digits_demo.models import DigitsClassifier
from mlflow import MlflowClient
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger
from torch.utils.data import DataLoader, TensorDataset

from trainguard.defenses.errors import ModelRejectedError
from trainguard.defenses.gate import (
    HeldoutSize,
    ModelGate,
    judge,
    resolvable_drop,
    rows_to_resolve,
    wilson_interval,
)
from trainguard.defenses.heldout import HeldoutMetrics, LabeledData, heldout_metrics


@pytest.fixture(scope="module")
def data() -> dict[str, LabeledData]:
    digits = load_digits_split(seed=1)
    x, y = torch.tensor(digits.x), torch.tensor(digits.y)
    return {
        "pretrain": LabeledData(x[:700], y[:700]),
        "retrain": LabeledData(x[700:1200], y[700:1200]),
        "holdout": LabeledData(x[1200:1560], y[1200:1560]),
    }


def _trainer(epochs: int, callbacks: list[pl.Callback], logger: object = False) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _loader(data: LabeledData) -> DataLoader:
    return DataLoader(TensorDataset(data.x, data.y), batch_size=64, shuffle=True)


@pytest.fixture(scope="module")
def pretrained(data: dict[str, LabeledData]) -> dict[str, torch.Tensor]:
    """Weights of the previous cycle's accepted model."""
    torch.manual_seed(0)
    model = DigitsClassifier(channels=8, lr=3e-3)
    _trainer(8, []).fit(model, _loader(data["pretrain"]))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _model(weights: dict[str, torch.Tensor]) -> DigitsClassifier:
    model = DigitsClassifier(channels=8, lr=3e-3)
    model.load_state_dict(weights)
    return model


def _relabelled(data: LabeledData, mapping: dict[int, int]) -> LabeledData:
    y = data.y.clone()
    for old, new in mapping.items():
        y[data.y == old] = new
    return LabeledData(data.x, y)


def _same_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_good_retraining_is_accepted_and_becomes_the_new_record(data, pretrained) -> None:
    model = _model(pretrained)
    gate = ModelGate(data["holdout"], num_classes=10, baseline="incoming")
    _trainer(2, [gate]).fit(model, _loader(data["retrain"]))
    assert gate.verdict is not None and gate.verdict.accepted, gate.verdict
    assert not _same_weights(model, pretrained)
    assert gate.record == gate.verdict.after


def test_poisoned_retraining_is_rejected_and_previous_weights_restored(data, pretrained) -> None:
    model = _model(pretrained)
    gate = ModelGate(data["holdout"], num_classes=10, baseline="incoming")
    shifted = LabeledData(data["retrain"].x, (data["retrain"].y + 1) % 10)
    with pytest.raises(ModelRejectedError, match="held-out accuracy dropped"):
        _trainer(2, [gate]).fit(model, _loader(shifted))
    assert gate.verdict is not None and not gate.verdict.accepted
    assert _same_weights(model, pretrained)
    assert heldout_metrics(model, data["holdout"], 10) == gate.verdict.before


def test_class_targeted_retraining_is_rejected_by_the_per_class_threshold(data, pretrained) -> None:
    model = _model(pretrained)
    gate = ModelGate(data["holdout"], num_classes=10, baseline="incoming", max_drop=0.15, raise_on_reject=False)
    _trainer(3, [gate]).fit(model, _loader(_relabelled(data["retrain"], {3: 8})))
    verdict = gate.verdict
    assert verdict is not None and not verdict.accepted
    assert verdict.before.accuracy - verdict.after.accuracy <= 0.15
    assert "class 3" in verdict.reason
    class_rows = int((data["holdout"].y == 3).sum())
    assert f"; n={class_rows}]" in verdict.reason and f"within chance at n={class_rows}" in verdict.reason
    assert _same_weights(model, pretrained)


def test_the_previous_cycles_record_is_the_bar(data, pretrained) -> None:
    model = _model(pretrained)
    measured = heldout_metrics(model, data["holdout"], 10)
    better = HeldoutMetrics(1.0, 1.0, measured.class_loss, tuple(1.0 for _ in measured.class_accuracy))
    gate = ModelGate(data["holdout"], num_classes=10, max_drop=0.001, previous=better, raise_on_reject=False)
    _trainer(1, [gate]).fit(model, _loader(data["retrain"]))
    assert gate.verdict is not None and not gate.verdict.accepted
    assert gate.verdict.before == better


def test_gate_state_survives_a_weights_only_checkpoint_round_trip(data, pretrained, tmp_path) -> None:
    gate = ModelGate(data["holdout"], num_classes=10, baseline="incoming")
    gate.record = heldout_metrics(_model(pretrained), data["holdout"], 10)
    gate.previous_weights = dict(pretrained)
    torch.save(gate.state_dict(), tmp_path / "gate.pt")
    restored = ModelGate(data["holdout"], num_classes=10, baseline="incoming")
    restored.load_state_dict(torch.load(tmp_path / "gate.pt", weights_only=True))
    assert restored.record == gate.record
    assert all(torch.equal(restored.previous_weights[k], v) for k, v in pretrained.items())


def test_a_resumed_fit_is_judged_against_the_cycles_starting_model(data, pretrained, tmp_path) -> None:
    shifted = _loader(LabeledData(data["retrain"].x, (data["retrain"].y + 1) % 10))
    first_gate = ModelGate(data["holdout"], num_classes=10, baseline="incoming", raise_on_reject=False)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="mid-cycle", save_last=False)
    interrupted = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        callbacks=[first_gate, saver],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    interrupted.fit(_model(pretrained), shifted)
    resumed_gate = ModelGate(data["holdout"], num_classes=10, baseline="incoming", raise_on_reject=False)
    model = _model(pretrained)
    with torch.no_grad():  # a different starting point: the gate must take the cycle's start from the checkpoint
        for p in model.parameters():
            p.add_(0.05)
    _trainer(2, [resumed_gate]).fit(model, shifted, ckpt_path=saver.best_model_path)
    assert resumed_gate.verdict is not None and not resumed_gate.verdict.accepted
    assert resumed_gate.verdict.before == first_gate.verdict.before
    assert _same_weights(model, pretrained)


def test_rejection_marks_the_mlflow_run_failed_with_the_reason(data, pretrained, mlflow_uri) -> None:
    model = _model(pretrained)
    gate = ModelGate(data["holdout"], num_classes=10, baseline="incoming")
    logger = MLFlowLogger(experiment_name="gate-tests", tracking_uri=mlflow_uri)
    shifted = LabeledData(data["retrain"].x, (data["retrain"].y + 1) % 10)
    with pytest.raises(ModelRejectedError):
        _trainer(1, [gate], logger=logger).fit(model, _loader(shifted))
    run = MlflowClient(mlflow_uri).get_run(logger.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["trainguard.gate"] == "rejected"
    assert run.data.tags["trainguard.gate.reason"] == gate.verdict.reason


def test_judge_ignores_classes_absent_from_the_holdout() -> None:
    nan = float("nan")
    before = HeldoutMetrics(0.1, 0.9, (0.1, nan), (0.9, nan))
    after = HeldoutMetrics(0.1, 0.9, (0.1, nan), (0.9, nan))
    assert judge(before, after, 0.02, 0.1).accepted


@pytest.mark.parametrize(("correct", "rows"), [(270, 300), (29, 30), (0, 12), (500, 500)])
def test_the_gate_states_accuracy_with_its_wilson_interval(correct: int, rows: int) -> None:
    from scipy.stats import binomtest

    expected = binomtest(correct, rows).proportion_ci(method="wilson")
    assert wilson_interval(correct / rows, rows) == pytest.approx((expected.low, expected.high))


def test_the_drop_a_holdout_can_resolve_shrinks_with_its_size() -> None:
    """At 300 rows near 80% accuracy, two measurements differ by up to 0.064 by chance: a 0.02 threshold is below
    what the set resolves; at 20,000 rows it is not. A class of 30 rows cannot resolve a 0.1 drop either."""
    assert resolvable_drop(0.8, 300) == pytest.approx(1.96 * (2 * 0.16 / 300) ** 0.5, rel=1e-3)
    assert resolvable_drop(0.8, 300) > 0.02 > resolvable_drop(0.8, 20_000)
    assert resolvable_drop(0.8, 30) > 0.1 > resolvable_drop(0.8, 200)
    needed = rows_to_resolve(0.02, 0.8)
    assert resolvable_drop(0.8, needed) <= 0.02 < resolvable_drop(0.8, needed - 1)


def test_a_drop_the_holdout_cannot_resolve_is_not_refused_and_the_verdict_says_so() -> None:
    """0.03 past a 0.02 threshold is within chance on 300 rows: accepted, the reason stating the intervals; the same
    drop on 20,000 rows is refused, as is a 0.2 class drop on 150 rows. Without sizes the thresholds apply as set."""
    before = HeldoutMetrics(0.3, 0.9, (0.3, 0.3), (0.9, 0.9))
    after = HeldoutMetrics(0.4, 0.87, (0.4, 0.4), (0.87, 0.87))
    verdict = judge(before, after, max_drop=0.02, max_class_drop=0.1, size=HeldoutSize(300, (150, 150)))
    assert verdict.accepted, verdict.reason
    low, high = wilson_interval(0.9, 300)
    assert f"0.9000 [95% CI {low:.3f}, {high:.3f}; n=300]" in verdict.reason
    assert f"drops under {resolvable_drop(0.885, 300):.4f} are within chance at n=300" in verdict.reason
    large = judge(before, after, max_drop=0.02, max_class_drop=0.1, size=HeldoutSize(20_000, (10_000, 10_000)))
    assert not large.accepted and "dropped by 0.0300" in large.reason
    class_drop = HeldoutMetrics(0.4, 0.8, (0.4, 0.4), (0.9, 0.7))
    refused = judge(before, class_drop, max_drop=0.2, max_class_drop=0.1, size=HeldoutSize(300, (150, 150)))
    assert not refused.accepted and "class 1 dropped by 0.2000" in refused.reason
    unsized = judge(before, after, max_drop=0.02, max_class_drop=0.1)
    assert not unsized.accepted and "CI" not in unsized.reason


def test_a_class_drop_past_its_threshold_but_within_chance_is_named_in_the_acceptance() -> None:
    before = HeldoutMetrics(0.3, 0.9, (0.3, 0.3), (0.925, 0.9))
    after = HeldoutMetrics(0.35, 0.88, (0.35, 0.35), (0.8, 0.92))
    verdict = judge(before, after, max_drop=0.05, max_class_drop=0.1, size=HeldoutSize(80, (40, 40)))
    assert verdict.accepted, verdict.reason
    assert "class 0 dropped by 0.1250, past 0.1 but within chance at n=40" in verdict.reason
