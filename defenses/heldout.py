"""Labelled tensors and the overall and per-class held-out metrics every RONI check measures on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class LabeledData:
    """Features (N x ...) and integer labels (N,) as tensors."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"{self.x.shape[0]} rows of features but {self.y.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @classmethod
    def of(cls, x: object, y: object) -> LabeledData:
        """Builds from arrays or tensors: float32 features, int64 labels."""
        return cls(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64))


@dataclass(frozen=True)
class HeldoutMetrics:
    """Mean cross-entropy and accuracy, overall and per class (NaN for a class absent from the held-out set)."""

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
    def from_dict(cls, data: dict[str, object]) -> HeldoutMetrics:
        return cls(
            loss=float(data["loss"]),
            accuracy=float(data["accuracy"]),
            class_loss=tuple(float(v) for v in data["class_loss"]),
            class_accuracy=tuple(float(v) for v in data["class_accuracy"]),
        )


def per_class_mean(values: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean of `values` (... x N) over the rows of each class: (... x num_classes), NaN where a class is absent."""
    onehot = F.one_hot(y, num_classes).to(values.dtype)
    counts = onehot.sum(0)
    sums = values @ onehot
    return sums / counts.where(counts > 0, torch.tensor(float("nan"), dtype=values.dtype))


@torch.no_grad()
def heldout_metrics(model: nn.Module, data: LabeledData, num_classes: int, batch_size: int = 4096) -> HeldoutMetrics:
    """Evaluates `model` in eval mode on `data` (its train/eval mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        logits = torch.cat(
            [model(data.x[i : i + batch_size].to(device)).cpu() for i in range(0, len(data), batch_size)]
        )
    finally:
        model.train(was_training)
    losses = F.cross_entropy(logits.float(), data.y, reduction="none")
    correct = (logits.argmax(1) == data.y).float()
    return HeldoutMetrics(
        loss=float(losses.mean()),
        accuracy=float(correct.mean()),
        class_loss=tuple(per_class_mean(losses, data.y, num_classes).tolist()),
        class_accuracy=tuple(per_class_mean(correct, data.y, num_classes).tolist()),
    )
