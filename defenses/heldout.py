"""Labelled tensors and the overall and per-group held-out metrics the gate and RONI measure on, for any task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainguard.defenses.forward import ModuleForward, plain_forward
from trainguard.defenses.task import Task, as_task, per_class_mean

__all__ = ["HeldoutMetrics", "LabeledData", "heldout_metrics", "metrics_of", "per_class_mean", "trivial_metrics"]


@dataclass(frozen=True)
class LabeledData:
    """Features (N x ...) and targets (N x ...) as tensors: integer labels, 0/1 label vectors or real values; `extras`
    are the model's other inputs (masks, lengths), N rows each, handed to a `forward(module, batch, x)` hook.

    The labelled data the gate, RONI and the held-out metrics take; `LabeledData.of` builds one from arrays.

    Attributes:
        x: The inputs, one row per sample.
        y: The targets, one row per sample.
        extras: The model's other inputs by name, N rows each (default none).

    Raises:
        ValueError: `x`, `y` or an extra input have different numbers of rows.
    """

    x: torch.Tensor
    y: torch.Tensor
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"{self.x.shape[0]} rows of features but {self.y.shape[0]} labels")
        for name, value in self.extras.items():
            if value.shape[0] != self.x.shape[0]:
                raise ValueError(f"{self.x.shape[0]} rows of features but {value.shape[0]} rows of {name!r}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batch(self, rows: slice | torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows as the dict batch a forward hook reads: `x`, `y` and the extras by name."""
        return {"x": self.x[rows], "y": self.y[rows], **{name: value[rows] for name, value in self.extras.items()}}

    def take(self, rows: slice | torch.Tensor) -> LabeledData:
        """The rows `rows`, extras included."""
        return LabeledData(self.x[rows], self.y[rows], {name: value[rows] for name, value in self.extras.items()})

    @classmethod
    def concat(cls, parts: Sequence[LabeledData]) -> LabeledData:
        """The parts' rows one after another, extras included (every part has the same extras)."""
        extras = {name: torch.cat([p.extras[name] for p in parts]) for name in parts[0].extras}
        return cls(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), extras)

    @classmethod
    def of(cls, x: object, y: object, task: Task | str | None = None) -> LabeledData:
        """Builds from arrays or tensors: float32 features; int64 labels for classification, float32 targets
        otherwise."""
        kind = as_task(task).kind
        dtype = torch.int64 if kind == "classification" else torch.float32
        return cls(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=dtype))


@dataclass(frozen=True)
class HeldoutMetrics:
    """Mean loss and accuracy (the task's `correct`), overall and per group: per class (NaN for a class absent from
    the held-out set), per label for multilabel, per output for regression, none for a custom task.

    Attributes:
        loss: The mean per-sample loss of the task.
        accuracy: The mean of the task's per-sample correctness.
        class_loss: The mean loss per group (class, label or output).
        class_accuracy: The mean correctness per group.
    """

    loss: float
    accuracy: float
    class_loss: tuple[float, ...]
    class_accuracy: tuple[float, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "class_loss": list(self.class_loss),
            "class_accuracy": list(self.class_accuracy),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeldoutMetrics:
        return cls(
            loss=float(data["loss"]),
            accuracy=float(data["accuracy"]),
            class_loss=tuple(float(v) for v in data["class_loss"]),
            class_accuracy=tuple(float(v) for v in data["class_accuracy"]),
        )


def metrics_of(
    outputs: torch.Tensor, y: torch.Tensor, task: Task | str | None = None, num_classes: int | None = None
) -> HeldoutMetrics:
    """The held-out metrics of `outputs` against targets `y` (pure: no model)."""
    task = as_task(task)
    group_loss, group_accuracy = task.group_metrics(outputs, y, num_classes)
    return HeldoutMetrics(
        loss=float(task.sample_loss(outputs.float(), y).mean()),
        accuracy=float(task.correct(outputs, y).mean()),
        class_loss=tuple(group_loss.tolist()),
        class_accuracy=tuple(group_accuracy.tolist()),
    )


def trivial_metrics(
    data: LabeledData, task: Task | str | None = None, num_classes: int | None = None
) -> HeldoutMetrics:
    """Overall held-out metrics of the best constant predictor (`Task.trivial_outputs`); its per-group metrics are
    NaN, since a constant predictor is right on whole groups or on none."""
    task = as_task(task)
    metrics = metrics_of(task.trivial_outputs(data.y, num_classes), data.y, task, num_classes)
    nan = float("nan")
    return HeldoutMetrics(
        metrics.loss,
        metrics.accuracy,
        tuple(nan for _ in metrics.class_loss),
        tuple(nan for _ in metrics.class_accuracy),
    )


@torch.no_grad()
def heldout_metrics(
    model: nn.Module,
    data: LabeledData,
    num_classes: int | None = None,
    batch_size: int = 4096,
    *,
    task: Task | str | None = None,
    forward: ModuleForward | None = None,
) -> HeldoutMetrics:
    """Evaluates `model` in eval mode on `data` (its train/eval mode is restored afterwards); `forward(module, batch,
    x)` reads extra inputs from `LabeledData.batch` (default `model(x)`); `num_classes` defaults to the outputs'.

    Args:
        model: The model, evaluated without gradients on the device of its parameters.
        data: The held-out rows.
        num_classes: Classification: how many per-class entries to report (None: the outputs' width).
        batch_size: Rows per forward pass.
        task: The task (a `Task` or a built-in's name; None: classification).
        forward: `forward(module, batch, x)` for a model with extra inputs (None: `model(x)`).

    Returns:
        The overall and per-group loss and accuracy.

    Raises:
        TaskMismatchError: The outputs or targets do not fit the task, or an unknown task name.
    """
    forward = forward or plain_forward
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        outputs = []
        for i in range(0, len(data), batch_size):
            batch = {k: v.to(device) for k, v in data.batch(slice(i, i + batch_size)).items()}
            outputs.append(forward(model, batch, batch["x"]).cpu())
    finally:
        model.train(was_training)
    return metrics_of(torch.cat(outputs), data.y, task, num_classes)
