"""APGD, the parameter-free core of AutoAttack (Croce & Hein, 2020, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks", ICML): PGD with momentum whose step size starts at 2 eps and
halves at fixed checkpoints when progress stalls, restarting from the best point found; on cross-entropy (APGD-CE)
or on the Difference of Logits Ratio loss (APGD-DLR), which is invariant to shifting and rescaling the logits; and
APGD-T, AutoAttack's targeted APGD on the targeted DLR loss, run against each of the top-k non-true classes in turn.

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
from typing import ClassVar, Literal, Unpack

import torch
from torch import nn
from torch.nn import functional as F
from typing_extensions import override

from trainguard.defenses.attacks.base import Attack, AttackKeywords
from trainguard.defenses.errors import AttackConfigError, TooFewClassesError

Objective = Literal["ce", "dlr", "dlr-targeted"]

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


def dlr_loss_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample targeted DLR loss -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) (AutoAttack's APGD-T): positive
    once the target's logit passes the true one; needs 4 or more classes."""
    if logits.dim() != 2 or logits.shape[1] < 4:
        raise TooFewClassesError(
            f"the targeted DLR loss needs logits of shape (batch, classes >= 4), got {tuple(logits.shape)}",
            classes=logits.shape[1] if logits.dim() == 2 else None,
        )
    ordered = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    aimed = logits.gather(1, target.view(-1, 1)).squeeze(1)
    return -(true - aimed) / (ordered[:, 0] - (ordered[:, 2] + ordered[:, 3]) / 2 + 1e-12)


def _ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


_OBJECTIVES = {"ce": _ce_loss, "dlr": dlr_loss}


@dataclass(frozen=True)
class _Run:
    """One run's result per sample: the point to return, whether it is misclassified, and the best loss reached."""

    x: torch.Tensor
    fooled: torch.Tensor
    loss: torch.Tensor

    def merge(self, rows: torch.Tensor, run: _Run) -> _Run:
        """This result with `run` (a run on `rows` of it) taken where it fooled the model or reached a higher loss."""
        take = run.fooled | (run.loss > self.loss[rows])
        rows = rows[take]
        return _Run(
            x=self.x.index_copy(0, rows, run.x[take]),
            fooled=self.fooled.index_copy(0, rows, run.fooled[take]),
            loss=self.loss.index_copy(0, rows, run.loss[take]),
        )


class APGD(Attack):
    """APGD on `objective` (`"ce"` or `"dlr"`) for `steps` iterations from each of `restarts` random starts.

    Restarts after the first run only on the samples not yet misclassified; a sample keeps a misclassified point as
    soon as one run finds it, else the highest-loss point of all runs (so more restarts never raise robust accuracy).
    The loss is the attack's own (per sample, in float32 at least); `loss=` is refused.
    APGD-DLR and APGD-T are untargeted.
    """

    objective: ClassVar[Objective] = "ce"

    def __init__(
        self, model: nn.Module, *, eps: float, steps: int = 100, restarts: int = 1, **kwargs: Unpack[AttackKeywords]
    ) -> None:
        if kwargs.get("loss") is not None:
            raise AttackConfigError(f"APGD maximises its own {self.objective} loss; loss= cannot be set")
        super().__init__(model, eps=eps, **kwargs)
        self.task.refuse_unless(("classification",), f"APGD-{self.objective.upper()}")
        checkpoints(steps)
        if restarts < 1:
            raise AttackConfigError(f"restarts must be >= 1, got {restarts!r}")
        if self.targeted and self.objective != "ce":
            raise AttackConfigError(
                f"APGD-{self.objective.upper()} is untargeted: it takes true labels (APGD-T picks its own targets)"
            )
        self.steps = int(steps)
        self.restarts = int(restarts)

    @override
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
            best = best.merge(todo, self._run(x[todo], y[todo], start[todo], eps, lower, upper))
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
        target: torch.Tensor | None = None,
    ) -> _Run:
        """Algorithm 1 of the paper from `start`, every sample with its own step size, best point and checkpoints
        (`target`: the class APGD-T aims each sample at)."""
        loss, grad, fooled = self._evaluate(start, y, target)
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
            loss, grad, wrong = self._evaluate(x_cur, y, target)
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

    def _evaluate(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample objective (to raise), its gradient w.r.t. `x` only, and which samples the model gets wrong."""
        x = x.detach().requires_grad_(True)
        with self.at_crafting_precision(x.device):
            logits = self.forward(x)
        logits32 = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = _OBJECTIVES[self.objective](logits32, y) if target is None else dlr_loss_targeted(logits32, y, target)
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


class APGDT(APGD):
    """AutoAttack's APGD-T: APGD on the targeted DLR loss against each of the `target_classes` highest-scoring
    non-true classes (9 by default; all of them when the model has fewer) in turn, `restarts` runs per target.

    `y` are true labels. Only samples still correctly classified go on to the next target or restart; a sample
    keeps the first misclassified point found, else its highest-loss point. Needs 4 or more classes
    (TooFewClassesError otherwise, at the first forward).
    """

    objective: ClassVar[Objective] = "dlr-targeted"

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float,
        steps: int = 100,
        restarts: int = 1,
        target_classes: int = 9,
        **kwargs: Unpack[AttackKeywords],
    ) -> None:
        super().__init__(model, eps=eps, steps=steps, restarts=restarts, **kwargs)
        if target_classes < 1:
            raise AttackConfigError(f"target_classes must be >= 1, got {target_classes!r}")
        self.target_classes = int(target_classes)

    @override
    def _perturb(
        self, x: torch.Tensor, y: torch.Tensor, eps: float, lower: torch.Tensor, upper: torch.Tensor
    ) -> torch.Tensor:
        with torch.no_grad(), self.at_crafting_precision(x.device):
            logits = self.forward(x)
        if logits.dim() != 2 or logits.shape[1] < 4:
            dlr_loss_targeted(logits, y, y)  # raises TooFewClassesError before any step
        ranked = logits.argsort(dim=1, descending=True)
        wrong = ranked[:, 0] != y
        dtype = torch.promote_types(logits.dtype, torch.float32)
        best = _Run(x=x, fooled=wrong, loss=torch.full(wrong.shape, -math.inf, dtype=dtype, device=x.device))
        for k in range(1, min(self.target_classes, logits.shape[1] - 1) + 1):
            for _ in range(self.restarts):
                start = self.random_start(x, eps, lower, upper)
                todo = (~best.fooled).nonzero().squeeze(1)
                if len(todo) == 0:
                    return best.x
                run = self._run(x[todo], y[todo], start[todo], eps, lower, upper, target=ranked[todo, k])
                best = best.merge(todo, run)
        return best.x


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values shaped to broadcast over samples shaped like `like`."""
    return values.view(-1, *([1] * (like.dim() - 1)))
