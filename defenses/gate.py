"""`RONIGate`: a Lightning callback that rejects a retrained model whose held-out metrics got worse.

At fit start it records the incoming model's held-out accuracy overall and per class (or takes the previous cycle's
record) and keeps its weights; at fit end it measures the new model. If the overall accuracy, or any class's,
drops by more than its threshold, the previous weights are put back, the verdict says why, and `ModelRejectedError`
is raised (Lightning then finalizes its loggers, an MLflow run included, as failed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytorch_lightning as pl
import torch

from trainguard.defenses.errors import ModelRejectedError
from trainguard.defenses.heldout import HeldoutMetrics, LabeledData, heldout_metrics


@dataclass(frozen=True)
class GateVerdict:
    """The gate's decision on one fit, with the metrics before and after it."""

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


def judge(before: HeldoutMetrics, after: HeldoutMetrics, max_drop: float, max_class_drop: float) -> GateVerdict:
    """Rejects when overall accuracy drops by more than `max_drop` or any class's by more than `max_class_drop`."""
    drop = before.accuracy - after.accuracy
    if drop > max_drop:
        reason = (
            f"held-out accuracy dropped by {drop:.4f} ({before.accuracy:.4f} -> {after.accuracy:.4f}), "
            f"more than {max_drop}"
        )
        return GateVerdict(False, reason, before, after)
    class_drops = [
        (b - a, c)
        for c, (b, a) in enumerate(zip(before.class_accuracy, after.class_accuracy, strict=True))
        if not (math.isnan(b) or math.isnan(a))
    ]
    worst, cls = max(class_drops, default=(0.0, -1))
    if worst > max_class_drop:
        reason = (
            f"held-out accuracy of class {cls} dropped by {worst:.4f} "
            f"({before.class_accuracy[cls]:.4f} -> {after.class_accuracy[cls]:.4f}), more than {max_class_drop}"
        )
        return GateVerdict(False, reason, before, after)
    return GateVerdict(
        True, f"held-out accuracy {before.accuracy:.4f} -> {after.accuracy:.4f} within thresholds", before, after
    )


class RONIGate(pl.Callback):
    """Gates a fit on held-out accuracy, overall and per class; restores the previous weights on rejection.

    `previous` is the record of the previous cycle's accepted model; without it the incoming model is measured at
    fit start. With `raise_on_reject=False` the fit ends normally and only `verdict` says the model was rejected.
    Every rank evaluates; rank 0's measurements are broadcast so all ranks take the same decision.
    """

    def __init__(
        self,
        holdout: LabeledData,
        num_classes: int,
        max_drop: float = 0.02,
        max_class_drop: float = 0.10,
        previous: HeldoutMetrics | None = None,
        raise_on_reject: bool = True,
    ) -> None:
        self.holdout = holdout
        self.num_classes = num_classes
        self.max_drop = max_drop
        self.max_class_drop = max_class_drop
        self.record = previous
        self.raise_on_reject = raise_on_reject
        self.previous_weights: dict[str, torch.Tensor] | None = None
        self.verdict: GateVerdict | None = None

    @property
    def state_key(self) -> str:
        return "RONIGate"

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> HeldoutMetrics:
        metrics = heldout_metrics(pl_module, self.holdout, self.num_classes)
        return HeldoutMetrics.from_dict(trainer.strategy.broadcast(metrics.to_dict(), src=0))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.verdict = None
        if self.previous_weights is None:
            self.previous_weights = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        if self.record is None:
            self.record = self._measure(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.record is not None and self.previous_weights is not None
        self.verdict = judge(self.record, self._measure(trainer, pl_module), self.max_drop, self.max_class_drop)
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

    def state_dict(self) -> dict[str, object]:
        return {
            "record": None if self.record is None else self.record.to_dict(),
            "previous_weights": self.previous_weights,
        }

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        record = state_dict.get("record")
        self.record = None if record is None else HeldoutMetrics.from_dict(record)
        self.previous_weights = state_dict.get("previous_weights")
