"""The supervised task a defense serves: the loss attacks maximise, what counts as a correct prediction, the held-out
metrics and the target checks, for classification, multi-label classification, regression or a user's loss and metric.

Every defense takes `task=` (a `Task` or a built-in's name; default classification), so robust accuracy, the gate and
RONI measure what the model is for instead of assuming class logits, and a defense that cannot serve a task refuses
it up front in one line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn import functional as F

from trainguard.defenses.errors import TaskMismatchError

TaskKind = Literal["classification", "multilabel", "regression", "custom"]
BUILT_IN: tuple[TaskKind, ...] = ("classification", "multilabel", "regression")
SampleFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Task:
    """What the model predicts and how its predictions are scored.

    - classification: outputs are class logits (N, C), targets integer labels (N,); loss cross-entropy; a sample is
      correct when the argmax is its label.
    - multilabel: outputs are per-label logits (N, L), targets 0/1 (N, L); loss BCE-with-logits summed over labels
      (the joint Bernoulli negative log-likelihood); a sample is correct when every label is right at logit > 0
      (`multilabel_accuracy="exact"`, the default: one wrong label is a wrong answer), or scores the fraction of
      labels right (`"per-label"`).
    - regression: outputs (N,) or (N, D) (or (N, 1) for targets (N,)), real targets; loss squared (`"mse"`) or
      absolute (`"l1"`) error summed over outputs; a sample is correct when every output is within `tolerance`.
    - custom: `loss(outputs, targets)` and `metric(outputs, targets)` return per-sample values (N,), the metric in
      [0, 1] (1 = correct); it has no per-group breakdown, no trivial predictor and no TRADES divergence.

    Attributes:
        kind: `"classification"` (the default), `"multilabel"`, `"regression"` or `"custom"` (use `Task.custom`).
        tolerance: Regression: the largest absolute error per output that still counts as correct (> 0).
        regression_loss: Regression: `"mse"` (squared error) or `"l1"` (absolute error).
        multilabel_accuracy: Multilabel: `"exact"` (every label right) or `"per-label"` (the fraction right).
        loss: Custom tasks only: the per-sample loss `loss(outputs, targets) -> (N,)` attacks maximise.
        metric: Custom tasks only: the per-sample score `metric(outputs, targets) -> (N,)` in [0, 1].

    Raises:
        TaskMismatchError: An unknown kind, a tolerance that is not finite and > 0, an unknown regression loss or
            multilabel accuracy, or `loss`/`metric` given without a custom kind (or missing with it).

    Example::

        from trainguard import AdversarialTraining, Task

        task = Task("regression", tolerance=0.1, regression_loss="l1")
        adversarial = AdversarialTraining("pgd", eps=0.05, ratio=0.5, task=task)
        custom = Task.custom(loss=my_per_sample_loss, metric=my_per_sample_score)
    """

    kind: TaskKind = "classification"
    tolerance: float = 0.5
    regression_loss: Literal["mse", "l1"] = "mse"
    multilabel_accuracy: Literal["exact", "per-label"] = "exact"
    loss: SampleFn | None = None
    metric: SampleFn | None = None

    def __post_init__(self) -> None:
        if self.kind not in (*BUILT_IN, "custom"):
            raise TaskMismatchError(
                f"unknown task {self.kind!r}: choose one of {', '.join(BUILT_IN)}, or Task.custom(loss, metric)",
                task=str(self.kind),
            )
        if not (math.isfinite(self.tolerance) and self.tolerance > 0):
            raise TaskMismatchError(
                f"task tolerance must be a finite number > 0, got {self.tolerance!r}", task=self.kind
            )
        if self.regression_loss not in ("mse", "l1") or self.multilabel_accuracy not in ("exact", "per-label"):
            raise TaskMismatchError(
                "task: regression_loss is 'mse' or 'l1'; multilabel_accuracy 'exact' or 'per-label'"
            )
        if (self.kind == "custom") != (self.loss is not None and self.metric is not None):
            raise TaskMismatchError(
                "a custom task takes both loss= and metric= (per-sample functions); built-in tasks take neither",
                task=self.kind,
            )

    @classmethod
    def custom(cls, loss: SampleFn, metric: SampleFn) -> Task:
        """A task scored by the user's per-sample `loss` (maximised by attacks) and `metric` (in [0, 1])."""
        return cls("custom", loss=loss, metric=metric)

    @property
    def metric_name(self) -> str:
        """What `correct` measures, for messages."""
        names = {
            "classification": "accuracy",
            "multilabel": f"{self.multilabel_accuracy} accuracy",
            "regression": f"within-{self.tolerance:g} rate",
            "custom": "metric",
        }
        return names[self.kind]

    @property
    def group_name(self) -> str:
        """What the per-group held-out metrics are per: class, label or output."""
        return {"classification": "class", "multilabel": "label", "regression": "output", "custom": "group"}[self.kind]

    def refuse_unless(self, kinds: tuple[TaskKind, ...], defense: str) -> None:
        """Raises, naming the task, when `defense` cannot serve it."""
        if self.kind not in kinds:
            raise TaskMismatchError(
                f"{defense} applies to {', '.join(kinds)} tasks, not to a {self.kind} task", task=self.kind
            )

    def check_targets(self, y: torch.Tensor) -> None:
        """Refuses, in one line, targets whose dtype or shape cannot belong to the task (no device synchronisation)."""
        if self.kind == "classification" and (y.is_floating_point() or y.dtype == torch.bool or y.dim() != 1):
            self._mismatch(
                f"targets must be integer class labels of shape (N,), got {_described(y)}; pass task='regression' "
                "for real-valued targets or task='multilabel' for 0/1 label vectors"
            )
        if self.kind == "multilabel" and y.dim() != 2:
            self._mismatch(f"targets must be 0/1 label vectors of shape (N, labels), got {_described(y)}")
        if self.kind == "regression" and (not y.is_floating_point() or y.dim() not in (1, 2)):
            self._mismatch(
                f"targets must be real values of shape (N,) or (N, outputs), got {_described(y)}; pass "
                "task='classification' for integer class labels"
            )

    def sample_loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The per-sample loss (N,): what attacks maximise (summed) and the held-out loss averages."""
        outputs, y = self._aligned(outputs, y)
        if self.kind == "classification":
            return F.cross_entropy(outputs, y, reduction="none")
        if self.kind == "multilabel":
            return F.binary_cross_entropy_with_logits(outputs, y, reduction="none").sum(1)
        if self.kind == "regression":
            return _rows(self._element_loss(outputs, y)).sum(1)
        assert self.loss is not None
        return self._per_sample(self.loss(outputs, y), outputs, "loss")

    def attack_loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed per-sample loss: per-sample input gradients that do not shrink with the batch size."""
        return self.sample_loss(outputs, y).sum()

    def correct(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample correctness in [0, 1] (N,): robust accuracy and the gate average it."""
        outputs, y = self._aligned(outputs.detach().float(), y)
        if self.kind == "classification":
            return (outputs.argmax(1) == y).float()
        if self.kind == "multilabel":
            right = (outputs > 0) == (y > 0.5)
            return right.all(1).float() if self.multilabel_accuracy == "exact" else right.float().mean(1)
        if self.kind == "regression":
            return _rows((outputs - y).abs() <= self.tolerance).all(1).float()
        assert self.metric is not None
        return self._per_sample(self.metric(outputs, y), outputs, "metric").float()

    def soft_correct(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A smooth per-sample score in [0, 1] (N,) that RONI averages: bounded, so a few hard rows cannot dominate it.

        The true class's probability; the mean probability of each label's true value; the mean Gaussian kernel
        `exp(-(error / tolerance)^2 / 2)` of the outputs; a custom task's metric.
        """
        outputs, y = self._aligned(outputs.float(), y)
        if self.kind == "classification":
            return outputs.softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        if self.kind == "multilabel":
            probs = outputs.sigmoid()
            return torch.where(y > 0.5, probs, 1 - probs).mean(-1)
        if self.kind == "regression":
            return _rows(torch.exp(-0.5 * ((outputs - y) / self.tolerance).square())).mean(1)
        assert self.metric is not None
        return self._per_sample(self.metric(outputs, y), outputs, "metric").float()

    def margin(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """An unbounded per-sample fit (N,), higher is better, that RONI's impacts are measured in: linear in the
        outputs where `soft_correct` saturates, so a confident model's held-out rows still register a push.

        The true class's logit minus the largest other; the mean logit signed by each label's true value; the mean
        log Gaussian kernel `-(error / tolerance)^2 / 2`; a custom task's metric.
        """
        outputs, y = self._aligned(outputs.float(), y)
        if self.kind == "classification":
            true = outputs.gather(-1, y.unsqueeze(-1)).squeeze(-1)
            others = outputs.scatter(-1, y.unsqueeze(-1), -torch.inf).amax(-1)
            return true - others
        if self.kind == "multilabel":
            return torch.where(y > 0.5, outputs, -outputs).mean(-1)
        if self.kind == "regression":
            return _rows(-0.5 * ((outputs - y) / self.tolerance).square()).mean(1)
        return self.soft_correct(outputs, y)

    def group_metrics(
        self, outputs: torch.Tensor, y: torch.Tensor, num_classes: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss and mean correctness per group (G,): per class (rows grouped by label, NaN for a class absent
        from `y`; `num_classes` defaults to the outputs' width), per label, per output; none for a custom task."""
        outputs, y = self._aligned(outputs.detach().float(), y)
        if self.kind == "classification":
            per_row = torch.stack([self.sample_loss(outputs, y), self.correct(outputs, y)])
            grouped = per_class_mean(per_row, y, num_classes or outputs.shape[1])
            return grouped[0], grouped[1]
        if self.kind == "multilabel":
            losses = F.binary_cross_entropy_with_logits(outputs, y, reduction="none")
            return losses.mean(0), ((outputs > 0) == (y > 0.5)).float().mean(0)
        if self.kind == "regression":
            flat_out, flat_y = _rows(outputs), _rows(y)
            within = (flat_out - flat_y).abs() <= self.tolerance
            return self._element_loss(flat_out, flat_y).mean(0), within.float().mean(0)
        empty = outputs.new_zeros(0)
        return empty, empty

    def trivial_outputs(self, y: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
        """Outputs of the best constant predictor fitted to `y`, one row per target: the logits of the class prior
        (argmax: the majority class), of each label's frequency, or the target mean."""
        if self.kind == "classification":
            prior = torch.bincount(y.long(), minlength=num_classes or 0).double() / len(y)
            return prior.clamp_min(1e-12).log().float().expand(len(y), -1)
        if self.kind == "multilabel":
            frequency = y.double().mean(0).clamp(1e-6, 1 - 1e-6)
            return (frequency / (1 - frequency)).log().float().expand(len(y), -1)
        if self.kind == "regression":
            return y.double().mean(0).float().expand_as(y)
        self._mismatch("has no trivial predictor to judge a first fit against; pass previous= or baseline='incoming'")
        raise AssertionError  # unreachable: _mismatch raises

    def clean_reference(self, outputs: torch.Tensor) -> torch.Tensor:
        """What TRADES keeps adversarial outputs close to: the clean class or label probabilities, or the outputs
        (differentiable: TRADES' robust term trains through both sides)."""
        outputs = outputs.float()
        if self.kind == "classification":
            return outputs.softmax(1)
        if self.kind == "multilabel":
            return outputs.sigmoid()
        if self.kind == "regression":
            return outputs
        self._mismatch("has no divergence between clean and adversarial outputs for TRADES; use AdversarialTraining")
        raise AssertionError  # unreachable: _mismatch raises

    def divergence(self, outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Summed divergence of `outputs` from a `clean_reference`: KL for classes, BCE against the clean sigmoid
        outputs for labels (the per-label KL plus the clean outputs' entropy, a constant), squared error for
        regression outputs."""
        if self.kind == "classification":
            return F.kl_div(F.log_softmax(outputs, dim=1), reference, reduction="sum")
        if self.kind == "multilabel":
            return F.binary_cross_entropy_with_logits(outputs, reference, reduction="sum")
        if self.kind == "regression":
            return F.mse_loss(outputs, reference.to(outputs.dtype), reduction="sum")
        self._mismatch("has no divergence between clean and adversarial outputs for TRADES; use AdversarialTraining")
        raise AssertionError  # unreachable: _mismatch raises

    def _element_loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        diff = outputs - y
        return diff.square() if self.regression_loss == "mse" else diff.abs()

    def _aligned(self, outputs: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets as the loss takes them, after checking that outputs and targets fit the task and each other."""
        self.check_targets(y)
        if self.kind == "classification":
            if outputs.dim() != 2 or outputs.shape[0] != y.shape[0]:
                self._mismatch(f"model outputs must be class logits (N, classes), got {_described(outputs)}")
            return outputs, y.long()
        if self.kind == "regression" and y.dim() == 1 and outputs.dim() == 2 and outputs.shape[1] == 1:
            y = y.unsqueeze(1)
        if self.kind in BUILT_IN and outputs.shape != y.shape:
            self._mismatch(f"model outputs {_described(outputs)} do not match targets {_described(y)}")
        return outputs, y.to(outputs.dtype) if outputs.is_floating_point() else y

    def _per_sample(self, values: torch.Tensor, outputs: torch.Tensor, what: str) -> torch.Tensor:
        if values.shape != (outputs.shape[0],):
            self._mismatch(f"the {what} must return one value per sample (N,), got shape {tuple(values.shape)}")
        return values

    def _mismatch(self, problem: str) -> None:
        raise TaskMismatchError(f"{self.kind} task: {problem}", task=self.kind)


CLASSIFICATION = Task()


def as_task(task: Task | str | None) -> Task:
    """A `Task` from a Task, a built-in's name (`"classification"`, `"multilabel"`, `"regression"`) or None
    (classification): what every defense's `task=` argument goes through.

    Args:
        task: A `Task` (returned as it is), a built-in task's name, or None.

    Returns:
        The task; a name gives that built-in with its default settings.

    Raises:
        TaskMismatchError: An unknown task name.
    """
    if task is None:
        return CLASSIFICATION
    if isinstance(task, Task):
        return task
    return Task(task)  # type: ignore[arg-type]  # __post_init__ refuses unknown names in one line


def per_class_mean(values: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean of `values` (... x N) over the rows of each class: (... x num_classes), NaN where a class is absent."""
    onehot = F.one_hot(y, num_classes).to(values.dtype)
    counts = onehot.sum(0)
    sums = values @ onehot
    return sums / counts.where(counts > 0, torch.tensor(float("nan"), dtype=values.dtype))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """One row per sample: (N,) becomes (N, 1)."""
    return t.reshape(t.shape[0], -1)


def _described(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} of shape {tuple(t.shape)}"
