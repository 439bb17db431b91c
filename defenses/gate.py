"""`ModelGate`: a Lightning callback that rejects a fitted model whose held-out metrics are worse than its baseline.

The baseline is the previous accepted model's record (`previous=`), else what `baseline=` says: the best constant
predictor ("trivial": the class prior's majority class, the label frequencies, the target mean), for a first fit from
scratch, whose random initialisation is no baseline (it may score well on a class by chance); or the incoming model
measured at fit start ("incoming"), for a fine-tune of an accepted model whose record was not kept.

Against a model record, the fit is rejected when the task's held-out accuracy (`Task.correct`), overall or of any
class/label/output, drops by more than its threshold; against the trivial predictor, unless it beats its overall
accuracy (a model no better than a constant has learnt nothing). On rejection the weights of fit start are put back,
the verdict says why, and `ModelRejectedError` is raised (Lightning then finalizes its loggers, an MLflow run
included, as failed).

The held-out set measures accuracy only to within its sampling error, and the gate refuses only what it can
resolve: a drop counts when it passes its threshold and `resolvable_drop`, the 95% half-width of the difference of
two accuracies measured on that many rows (a smaller drop is what a clean retrain shows by chance on a small set).
Each accuracy in the verdict comes with its Wilson 95% interval. A threshold under the resolvable drop is in effect
raised to it, which `trainguard check` warns about before a cycle runs, with the rows that would resolve it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from typing_extensions import override

from trainguard.defenses.errors import ModelRejectedError, ScreeningInputError
from trainguard.defenses.forward import ModuleForward
from trainguard.defenses.heldout import HeldoutMetrics, LabeledData, heldout_metrics, trivial_metrics
from trainguard.defenses.task import Task, as_task

Baseline = Literal["trivial", "incoming"]
Z95 = 1.959963984540054
"""The standard normal quantile of a two-sided 95% interval."""


def family_z(groups: int) -> float:
    """The normal quantile that keeps 95% for `groups` drops tested at once (Bonferroni): every class is compared,
    so at 1.96 each a ten-class gate would refuse one clean retrain in three by chance."""
    return NormalDist().inv_cdf(1 - 0.025 / max(groups, 1))


@dataclass(frozen=True)
class HeldoutSize:
    """How many held-out rows the gate measures on: in all, and per group.

    A group is a class's rows for classification; for other tasks every row counts for each label or output.

    Args:
        rows: The held-out rows in all.
        group_rows: Rows per group (empty: every group has `rows`).

    Example::

        size = HeldoutSize.of(holdout, Task("classification"), num_classes=10)
        resolvable_drop(0.9, size.group(3))  # the drop class 3's rows can tell from chance
    """

    rows: int
    group_rows: tuple[int, ...] = ()

    @classmethod
    def of(cls, holdout: LabeledData, task: Task, num_classes: int | None) -> HeldoutSize:
        if task.kind != "classification":
            return cls(len(holdout))
        counts = torch.bincount(holdout.y.long().flatten(), minlength=num_classes or 0)
        return cls(len(holdout), tuple(int(c) for c in counts))

    def group(self, index: int) -> int:
        return self.group_rows[index] if index < len(self.group_rows) else self.rows


def wilson_interval(accuracy: float, rows: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy measured on `rows` rows (sound near 0 and 1, unlike the normal one)."""
    if rows <= 0 or math.isnan(accuracy):
        return 0.0, 1.0
    centre = (accuracy + z * z / (2 * rows)) / (1 + z * z / rows)
    half = z * math.sqrt(accuracy * (1 - accuracy) / rows + z * z / (4 * rows * rows)) / (1 + z * z / rows)
    return max(0.0, centre - half), min(1.0, centre + half)


def resolvable_drop(accuracy: float, rows: int, z: float = Z95) -> float:
    """The 95% half-width of the difference of two accuracies near `accuracy` measured on `rows` rows each,
    z * sqrt(2 p (1 - p) / n): a smaller drop is within what the held-out set cannot tell from chance. It treats the
    two measurements as independent, an upper bound for two models whose errors agree more often than chance."""
    if rows <= 0:
        return math.inf
    p = min(max(accuracy, 0.0), 1.0)
    return z * math.sqrt(2 * p * (1 - p) / rows)


def rows_to_resolve(drop: float, accuracy: float, z: float = Z95) -> int:
    """The held-out rows at which `resolvable_drop(accuracy, rows)` comes down to `drop`."""
    p = min(max(accuracy, 0.0), 1.0)
    return math.ceil(2 * p * (1 - p) * (z / drop) ** 2)


def _stated(accuracy: float, rows: int | None) -> str:
    """`accuracy` with its Wilson 95% interval when the rows are known."""
    if rows is None:
        return f"{accuracy:.4f}"
    low, high = wilson_interval(accuracy, rows)
    return f"{accuracy:.4f} [95% CI {low:.3f}, {high:.3f}; n={rows}]"


def _resolvable(before: float, after: float, rows: int | None, z: float = Z95) -> float:
    """The drop the held-out rows can tell from chance between two accuracies (0 when their number is unknown)."""
    return 0.0 if rows is None else resolvable_drop((before + after) / 2, rows, z)


def _resolution(before: float, after: float, rows: int | None, z: float = Z95) -> str:
    if rows is None:
        return ""
    return f"; drops under {_resolvable(before, after, rows, z):.4f} are within chance at n={rows}"


@dataclass(frozen=True)
class GateVerdict:
    """The gate's decision on one fit, with the metrics before and after it.

    Args:
        accepted: Whether the fitted model passed.
        reason: Why, with each accuracy's 95% interval and the drop the held-out set can resolve.
        before: The baseline's held-out metrics (the previous record, the incoming model's or the trivial
            predictor's).
        after: The fitted model's held-out metrics.

    Example::

        gate = ModelGate(holdout, num_classes=10, raise_on_reject=False)
        Trainer(callbacks=[gate]).fit(model, datamodule)
        verdict = gate.verdict
        print(verdict.accepted, verdict.reason, verdict.to_dict()["after"])
    """

    accepted: bool
    reason: str
    before: HeldoutMetrics
    after: HeldoutMetrics

    def to_dict(self) -> dict[str, object]:
        return {
            "accepted": self.accepted,
            "reason": self.reason,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
        }


def judge(
    before: HeldoutMetrics,
    after: HeldoutMetrics,
    max_drop: float,
    max_class_drop: float,
    task: Task | None = None,
    size: HeldoutSize | None = None,
) -> GateVerdict:
    """Rejects when overall accuracy drops by more than `max_drop` or any group's by more than `max_class_drop`;
    with the held-out `size`, only by more than the set can resolve too (for groups, at 95% over all of them), and
    the reason states each accuracy's 95% interval and that resolvable drop."""
    task = as_task(task)
    metric, group = _metric(task), task.group_name
    rows = None if size is None else size.rows
    drop = before.accuracy - after.accuracy
    if drop > max_drop and drop > _resolvable(before.accuracy, after.accuracy, rows):
        shown = f"{_stated(before.accuracy, rows)} -> {_stated(after.accuracy, rows)}"
        reason = (
            f"held-out {metric} dropped by {drop:.4f} ({shown}), more than {max_drop}"
            f"{_resolution(before.accuracy, after.accuracy, rows)}"
        )
        return GateVerdict(False, reason, before, after)
    class_drops = [
        (b - a, c)
        for c, (b, a) in enumerate(zip(before.class_accuracy, after.class_accuracy, strict=True))
        if not (math.isnan(b) or math.isnan(a))
    ]
    z = family_z(len(class_drops))

    def rows_of(index: int) -> int | None:
        return None if size is None else size.group(index)

    def resolvable(index: int) -> float:
        return _resolvable(before.class_accuracy[index], after.class_accuracy[index], rows_of(index), z)

    over = [(d, c) for d, c in class_drops if d > max_class_drop]
    resolved = [(d, c) for d, c in over if d > resolvable(c)]
    if resolved:
        worst, cls = max(resolved)
        b, a = before.class_accuracy[cls], after.class_accuracy[cls]
        n = rows_of(cls)
        reason = (
            f"held-out {metric} of {group} {cls} dropped by {worst:.4f} ({_stated(b, n)} -> {_stated(a, n)}), "
            f"more than {max_class_drop}{_resolution(b, a, n, z)} (95% over {len(class_drops)} {group} drops)"
        )
        return GateVerdict(False, reason, before, after)
    within = ""
    if over and size is not None:
        worst, cls = max(over)
        within = (
            f"; {group} {cls} dropped by {worst:.4f}, past {max_class_drop} but within chance at n={rows_of(cls)} "
            f"(resolvable {resolvable(cls):.4f}, 95% over {len(class_drops)} {group} drops)"
        )
    reason = (
        f"held-out {metric} {_stated(before.accuracy, rows)} -> {_stated(after.accuracy, rows)} within thresholds"
        f"{_resolution(before.accuracy, after.accuracy, rows)}{within}"
    )
    return GateVerdict(True, reason, before, after)


def judge_first_fit(
    trivial: HeldoutMetrics, after: HeldoutMetrics, task: Task | None = None, size: HeldoutSize | None = None
) -> GateVerdict:
    """Accepts a first fit only when it beats the trivial predictor's overall accuracy (or is perfect)."""
    metric = _metric(as_task(task))
    shown = _stated(after.accuracy, None if size is None else size.rows)
    if after.accuracy < 1.0 and after.accuracy <= trivial.accuracy:
        reason = f"held-out {metric} {shown} is no better than the trivial predictor's {trivial.accuracy:.4f}"
        return GateVerdict(False, reason, trivial, after)
    reason = f"held-out {metric} {shown} beats the trivial predictor's {trivial.accuracy:.4f}"
    return GateVerdict(True, reason, trivial, after)


def _metric(task: Task) -> str:
    return "accuracy" if task.kind == "classification" else task.metric_name


class ModelGate(pl.Callback):
    """Gates a fit on the task's held-out accuracy, overall and per group, and restores the fit's starting weights
    on rejection.

    At fit start it keeps the module's weights (and with `baseline="incoming"` and no `previous`, measures the
    incoming model); at fit end it measures the fitted model on `holdout` and sets `verdict`. Every rank evaluates;
    rank 0's measurements are broadcast so all ranks take the same decision. An MLflow logger gets the verdict as
    the tags `trainguard.gate` and `trainguard.gate.reason`.

    Args:
        holdout: The held-out rows the fit never trains on (not empty).
        num_classes: The classes of a classification task (None: the width of the model's outputs).
        max_drop: The overall accuracy drop, as a fraction, that rejects the fit (when the held-out set can
            resolve it).
        max_class_drop: The drop of any class's (label's, output's) accuracy that rejects the fit.
        previous: The record of the previous accepted model: the baseline.
        raise_on_reject: Whether a rejection raises `ModelRejectedError` (Lightning then finalizes its loggers as
            failed); False: the fit ends normally and only `verdict` says the model was rejected.
        baseline: Without `previous`: `"trivial"` judges the fit against the best constant predictor (a first fit
            from scratch is not held to its random initialisation); `"incoming"` measures the incoming model at fit
            start (a fine-tune of an accepted model whose record was not kept).
        task: A `Task` or its name: what correct means (default classification).
        forward: `forward(module, batch, x)` reads extra model inputs from `LabeledData.batch`.

    Raises:
        ScreeningInputError: An unknown `baseline` or an empty `holdout`.
        TaskMismatchError: Held-out targets that do not fit the task.
        ModelRejectedError: At fit end, on rejection with `raise_on_reject=True`.

    Example::

        from pytorch_lightning import Trainer
        from trainguard.defenses import ModelGate

        gate = ModelGate(holdout, num_classes=10, max_drop=0.02, previous=last_record, raise_on_reject=False)
        Trainer(callbacks=[gate]).fit(model, datamodule)
        if not gate.verdict.accepted:
            print("rejected:", gate.verdict.reason)  # the weights of fit start are back in `model`
    """

    def __init__(
        self,
        holdout: LabeledData,
        num_classes: int | None = None,
        max_drop: float = 0.02,
        max_class_drop: float = 0.10,
        previous: HeldoutMetrics | None = None,
        raise_on_reject: bool = True,
        *,
        baseline: Baseline = "trivial",
        task: Task | str | None = None,
        forward: ModuleForward | None = None,
    ) -> None:
        if baseline not in ("trivial", "incoming"):
            raise ScreeningInputError(f"gate baseline must be 'trivial' or 'incoming', got {baseline!r}")
        self.task = as_task(task)
        if len(holdout) == 0:
            raise ScreeningInputError("the gate's held-out set is empty")
        self.task.check_targets(holdout.y)
        self.holdout = holdout
        self.size = HeldoutSize.of(holdout, self.task, num_classes)
        self.num_classes = num_classes
        self.max_drop = max_drop
        self.max_class_drop = max_class_drop
        self.record = previous
        self.raise_on_reject = raise_on_reject
        self.baseline = baseline
        self.forward = forward
        needs_trivial = baseline == "trivial" and previous is None
        self.trivial = trivial_metrics(holdout, self.task, num_classes) if needs_trivial else None
        self.previous_weights: dict[str, torch.Tensor] | None = None
        self.verdict: GateVerdict | None = None

    @property
    @override
    def state_key(self) -> str:
        return "ModelGate"

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> HeldoutMetrics:
        """Rank 0's measurements and held-out size on every rank (a rank may hold another share of the set)."""
        metrics = heldout_metrics(pl_module, self.holdout, self.num_classes, task=self.task, forward=self.forward)
        shared, rows, groups = trainer.strategy.broadcast(
            (metrics.to_dict(), self.size.rows, list(self.size.group_rows)), src=0
        )
        self.size = HeldoutSize(int(rows), tuple(int(n) for n in groups))
        return HeldoutMetrics.from_dict(shared)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.verdict = None
        if self.previous_weights is None:
            self.previous_weights = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        if self.record is None and self.baseline == "incoming":
            self.record = self._measure(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.previous_weights is not None
        after = self._measure(trainer, pl_module)
        if self.record is not None:
            self.verdict = judge(self.record, after, self.max_drop, self.max_class_drop, self.task, self.size)
        else:
            trivial = self.trivial or trivial_metrics(self.holdout, self.task, self.num_classes)
            self.verdict = judge_first_fit(trivial, after, self.task, self.size)
        self._tag_loggers(trainer)
        if self.verdict.accepted:
            self.record = self.verdict.after
            self.previous_weights = None
            return
        pl_module.load_state_dict(self.previous_weights)
        self.previous_weights = None
        if self.raise_on_reject:
            raise ModelRejectedError(self.verdict.reason)

    def _tag_loggers(self, trainer: pl.Trainer) -> None:
        """Marks the verdict on MLflow loggers (rank 0 only, as Lightning loggers do)."""
        from pytorch_lightning.loggers import MLFlowLogger

        assert self.verdict is not None
        if trainer.global_rank != 0:
            return
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.set_tag(
                    logger.run_id, "trainguard.gate", "accepted" if self.verdict.accepted else "rejected"
                )
                logger.experiment.set_tag(logger.run_id, "trainguard.gate.reason", self.verdict.reason)

    @override
    def state_dict(self) -> dict[str, object]:
        return {
            "record": None if self.record is None else self.record.to_dict(),
            "previous_weights": self.previous_weights,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        record = state_dict.get("record")
        self.record = None if record is None else HeldoutMetrics.from_dict(record)
        self.previous_weights = state_dict.get("previous_weights")
