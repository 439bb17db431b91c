"""APGD, the parameter-free core of AutoAttack (Croce & Hein, 2020, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks", ICML): PGD with momentum whose step size starts at 2 eps and
halves at fixed checkpoints when progress stalls, restarting from the best point found; on cross-entropy (APGD-CE)
or on the Difference of Logits Ratio loss (APGD-DLR), which is invariant to shifting and rescaling the logits.

The algorithm follows the paper (Algorithm 1 and Section 3): checkpoints w_j = ceil(p_j * N) with p_0 = 0,
p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); at each checkpoint the step size of a sample halves, and
the sample restarts from its best point, when (1) fewer than rho = 0.75 of its steps since the last checkpoint raised
the loss, or (2) its step size was not halved at the last checkpoint and its best loss has not risen since.
Momentum alpha = 0.75 after a plain first step. Everything runs batched on the input's device, per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F

from trainguard.defenses.attacks.base import Attack
from trainguard.defenses.errors import AttackConfigError, TooFewClassesError

Objective = Literal["ce", "dlr"]

RHO = 0.75
MOMENTUM = 0.75
INITIAL_STEP = 2.0  # times eps
_P1, _DECAY, _MIN_GAP = Fraction(22, 100), Fraction(3, 100), Fraction(6, 100)


def checkpoint_fractions() -> tuple[Fraction, ...]:
    """The published p_j up to 1, as exact rationals: 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99."""
    fractions = [Fraction(0), _P1]
    while True:
        gap = max(fractions[-1] - fractions[-2] - _DECAY, _MIN_GAP)
        if fractions[-1] + gap > 1:
            return tuple(fractions)
        fractions.append(fractions[-1] + gap)


def checkpoints(steps: int) -> tuple[int, ...]:
    """The iterations w_j = ceil(p_j * steps) at which step sizes may halve, w_0 = 0 first, distinct and increasing."""
    if steps < 1:
        raise AttackConfigError(f"steps must be >= 1, got {steps!r}")
    return tuple(sorted({math.ceil(p * steps) for p in checkpoint_fractions()}))


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample DLR loss -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3): positive once the sample is misclassified."""
    if logits.dim() != 2 or logits.shape[1] < 3:
        raise TooFewClassesError(
            f"the DLR loss needs logits of shape (batch, classes >= 3), got {tuple(logits.shape)}",
            classes=logits.shape[1] if logits.dim() == 2 else None,
        )
    ordered = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    top_is_true = logits.argmax(dim=1) == y
    other = torch.where(top_is_true, ordered[:, 1], ordered[:, 0])
    return -(true - other) / (ordered[:, 0] - ordered[:, 2] + 1e-12)


def _ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


_OBJECTIVES = {"ce": _ce_loss, "dlr": dlr_loss}


@dataclass(frozen=True)
class _Run:
    """One run's result per sample: the point to return, whether it is misclassified, and the best loss reached."""

    x: torch.Tensor
    fooled: torch.Tensor
    loss: torch.Tensor


class APGD(Attack):
    """APGD on `objective` (`"ce"` or `"dlr"`) for `steps` iterations from each of `restarts` random starts.

    Restarts after the first run only on the samples not yet misclassified; a sample keeps a misclassified point as
    soon as one run finds it, else the highest-loss point of all runs (so more restarts never raise robust accuracy).
    The loss is the attack's own (per sample, in float32 at least); `loss=` is refused. APGD-DLR is untargeted only.
    """

    objective: ClassVar[Objective] = "ce"

    def __init__(self, model: nn.Module, *, eps: float, steps: int = 100, restarts: int = 1, **kwargs: object) -> None:
        if kwargs.get("loss") is not None:
            raise AttackConfigError(f"APGD maximises its own {self.objective} loss; loss= cannot be set")
        super().__init__(model, eps=eps, **kwargs)
        self.task.refuse_unless(("classification",), f"APGD-{self.objective.upper()}")
        checkpoints(steps)
        if restarts < 1:
            raise AttackConfigError(f"restarts must be >= 1, got {restarts!r}")
        if self.targeted and self.objective == "dlr":
            raise AttackConfigError("APGD-DLR is untargeted (AutoAttack's targeted DLR variant is not implemented)")
        self.steps = int(steps)
        self.restarts = int(restarts)

    def _perturb(
        self, x: torch.Tensor, y: torch.Tensor, eps: float, lower: torch.Tensor, upper: torch.Tensor
    ) -> torch.Tensor:
        best: _Run | None = None
        for _ in range(self.restarts):
            # Every restart draws a start for the whole batch: the first run is the same with or without restarts.
            start = self.random_start(x, eps, lower, upper)
            if best is None:
                best = self._run(x, y, start, eps, lower, upper)
                continue
            todo = (~best.fooled).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            run = self._run(x[todo], y[todo], start[todo], eps, lower, upper)
            take = run.fooled | (run.loss > best.loss[todo])
            rows = todo[take]
            best = _Run(
                x=best.x.index_copy(0, rows, run.x[take]),
                fooled=best.fooled.index_copy(0, rows, run.fooled[take]),
                loss=best.loss.index_copy(0, rows, run.loss[take]),
            )
        assert best is not None
        return best.x

    def _run(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        start: torch.Tensor,
        eps: float,
        lower: torch.Tensor,
        upper: torch.Tensor,
    ) -> _Run:
        """Algorithm 1 of the paper from `start`, every sample with its own step size, best point and checkpoints."""
        loss, grad, fooled = self._evaluate(start, y)
        x_fooled, x_max, f_max, grad_max = start, start, loss, grad
        step = torch.full_like(loss, INITIAL_STEP * eps)
        x_prev = x_cur = start
        marks = set(checkpoints(self.steps)[1:])
        increases = torch.zeros_like(loss)
        last_mark, f_max_at_mark = 0, f_max
        halved_at_mark = torch.zeros_like(fooled)
        for k in range(self.steps):
            z = self.project(self.step(x_cur, grad, _rows(step, x)), x, eps, lower, upper)
            if k == 0:
                x_next = z
            else:
                moved = x_cur + MOMENTUM * (z - x_cur) + (1 - MOMENTUM) * (x_cur - x_prev)
                x_next = self.project(moved, x, eps, lower, upper)
            x_prev, x_cur = x_cur, x_next
            previous = loss
            loss, grad, wrong = self._evaluate(x_cur, y)
            x_fooled = torch.where(_rows(wrong, x), x_cur, x_fooled)
            fooled = fooled | wrong
            increases += loss > previous
            better = loss > f_max
            x_max = torch.where(_rows(better, x), x_cur, x_max)
            grad_max = torch.where(_rows(better, x), grad, grad_max)
            f_max = torch.where(better, loss, f_max)
            if k + 1 in marks:
                few_increases = increases < RHO * (k + 1 - last_mark)
                stalled = ~halved_at_mark & (f_max <= f_max_at_mark)
                halve = few_increases | stalled
                step = torch.where(halve, step / 2, step)
                x_cur = torch.where(_rows(halve, x), x_max, x_cur)
                grad = torch.where(_rows(halve, x), grad_max, grad)
                loss = torch.where(halve, f_max, loss)
                increases = torch.zeros_like(increases)
                last_mark, f_max_at_mark, halved_at_mark = k + 1, f_max, halve
        return _Run(x=torch.where(_rows(fooled, x), x_fooled, x_max), fooled=fooled, loss=f_max)

    def _evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample objective (to raise), its gradient w.r.t. `x` only, and which samples the model gets wrong."""
        x = x.detach().requires_grad_(True)
        with self.precision(x.device):
            logits = self.forward(x)
        loss = _OBJECTIVES[self.objective](logits.to(torch.promote_types(logits.dtype, torch.float32)), y)
        if self.targeted:
            loss = -loss
        (grad,) = torch.autograd.grad(loss.sum(), x)
        predicted = logits.detach().argmax(dim=1)
        wrong = predicted == y if self.targeted else predicted != y
        return loss.detach(), grad, wrong


class APGDCE(APGD):
    """APGD on cross-entropy (AutoAttack's first attack); targeted, it lowers the cross-entropy to the target."""

    objective: ClassVar[Objective] = "ce"


class APGDDLR(APGD):
    """APGD on the DLR loss (untargeted; needs 3 or more classes, refused with TooFewClassesError otherwise)."""

    objective: ClassVar[Objective] = "dlr"


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values shaped to broadcast over samples shaped like `like`."""
    return values.view(-1, *([1] * (like.dim() - 1)))
