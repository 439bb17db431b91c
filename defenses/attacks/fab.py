"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein, 2020, "Minimally distorted adversarial examples
with a fast adaptive boundary attack", ICML), as AutoAttack's standard version runs it: a minimum-norm attack that
linearises the boundary between the true class and a target class, projects both the current point and the original
input onto it (within the bounds), and steps to a mix of the two, biased towards the original input.

Per iteration (Algorithm 1 with the paper's constants): d1, d2 = the least-norm steps from the current point x1 and
from the input x0 onto the linearised boundary; alpha = min(|d1| / (|d1| + |d2|), alpha_max = 0.1);
x1 <- clip((1 - alpha)(x1 + eta d1) + alpha (x0 + eta d2)) with eta = 1.05; where x1 is misclassified it is kept if
closer to x0 than the best point so far, and x1 <- x0 + beta (x1 - x0) with beta = 0.9 backs off the boundary.
The targets are the classes of the 2nd, 3rd, ... highest clean logits (9 of them at most); each goes on with the
rows no earlier target broke within eps. A row counts as broken when the model misclassifies it (any wrong class, as
in AutoAttack) at a norm <= eps; rows FAB cannot break within eps are returned unchanged.
"""

from __future__ import annotations

from typing import Unpack

import torch
from torch import nn
from typing_extensions import override

from trainguard.defenses.attacks.base import Attack, AttackKeywords, Norm
from trainguard.defenses.errors import AttackConfigError, TooFewClassesError

ALPHA_MAX = 0.1
ETA = 1.05
BETA = 0.9
TARGETS = 9
_MIN_STEP = 1e-8


def boundary_step(w: torch.Tensor, r: torch.Tensor, low: torch.Tensor, high: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per row, the least-norm d with w.d = r and low <= d <= high (low <= 0 <= high), exactly; where no d in the box
    reaches w.d = r, the box corner that gets closest.

    With r >= 0 (else flip w and r), the optimum is d_i = sign(w_i) min(lam, room_i) for L-inf and
    d_i = w_i min(lam, room_i / |w_i|) for L2, room_i being how far d_i may move in w_i's direction; w.d is then
    sum_i c_i min(lam, k_i) (c = |w|, k = room for L-inf; c = w^2, k = room / |w| for L2), piecewise linear in lam,
    and the least lam reaching r is read off its breakpoints after one sort.
    """
    sign = torch.where(r < 0, -1.0, 1.0).to(w.dtype)
    w, r = w * sign[:, None], r * sign
    size = w.abs()
    moving = size > 0
    room = torch.where(w > 0, high, -low)
    if norm == "inf":
        weight, knee = size, room
    else:
        weight, knee = size * size, room / torch.where(moving, size, 1.0)
    weight = torch.where(moving, weight, 0.0)
    knee = torch.where(moving, knee, 0.0)
    knees, order = knee.sort(dim=1)
    weights = weight.gather(1, order)
    reached = (weights * knees).cumsum(1) - weights * knees  # from the coordinates already at their room
    slope = weights.flip(1).cumsum(1).flip(1)  # from the coordinates still moving
    at_knee = reached + slope * knees
    first = (at_knee < r[:, None]).sum(1, keepdim=True)
    feasible = first.squeeze(1) < w.shape[1]
    first = first.clamp(max=w.shape[1] - 1)
    lam = ((r[:, None] - reached.gather(1, first)) / slope.gather(1, first).clamp_min(1e-30)).clamp_min(0)
    lam = torch.where(feasible[:, None], lam, torch.inf)
    reach = torch.minimum(lam, knee)
    d = w.sign() * reach if norm == "inf" else w * reach
    return d


class FABT(Attack):
    """Targeted FAB (AutoAttack's FAB-T): `steps` iterations per target and restart, against each of the top
    `target_classes` non-true classes in turn (fewer if the model has fewer classes).

    The first run per target starts at the input; `restarts - 1` more start at a uniform random point of the eps/2
    ball (AutoAttack: of its surface). `y` are the true labels: FAB-T picks its own targets, so `targeted=True` and
    `loss=` are refused. It ignores the attack's `crafting_precision`: its step divides a logit difference by a
    gradient norm near the boundary, where half precision's error is as large as that difference; it runs in the
    input's dtype (float32 at least).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float,
        steps: int = 100,
        restarts: int = 1,
        target_classes: int = TARGETS,
        **kwargs: Unpack[AttackKeywords],
    ) -> None:
        if kwargs.get("loss") is not None:
            raise AttackConfigError("FAB-T steps to the linearised class boundary; loss= cannot be set")
        if kwargs.get("targeted"):
            raise AttackConfigError("FAB-T picks its own targets (the top non-true classes); pass true labels")
        super().__init__(model, eps=eps, **kwargs)
        self.task.refuse_unless(("classification",), "FAB-T")
        for name, value in (("steps", steps), ("restarts", restarts), ("target_classes", target_classes)):
            if value < 1:
                raise AttackConfigError(f"{name} must be >= 1, got {value!r}")
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.target_classes = int(target_classes)

    @override
    def _perturb(
        self, x: torch.Tensor, y: torch.Tensor, eps: float, lower: torch.Tensor, upper: torch.Tensor
    ) -> torch.Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        x0 = x.to(work)
        lo, hi = lower.to(work).expand_as(x0), upper.to(work).expand_as(x0)
        with torch.no_grad():
            logits = self.forward(x0)
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise TooFewClassesError(
                f"FAB-T needs logits of shape (batch, classes >= 2), got {tuple(logits.shape)}",
                classes=logits.shape[1] if logits.dim() == 2 else None,
            )
        ranked = logits.argsort(dim=1, descending=True)
        robust = ranked[:, 0] == y
        out = x0.clone()
        for rank in range(1, min(self.target_classes, logits.shape[1] - 1) + 1):
            for restart in range(self.restarts):
                rows = robust.nonzero().squeeze(1)
                if len(rows) == 0:
                    break
                start = x0[rows] if restart == 0 else self.random_start(x0[rows], eps, lo[rows], hi[rows], scale=0.5)
                best, norm = self._run(x0[rows], y[rows], ranked[rows, rank], start, lo[rows], hi[rows])
                won = norm <= eps
                out[rows[won]] = best[won]
                robust[rows[won]] = False
        # Casting back to a narrower input dtype may round a point just past eps: project (a no-op otherwise).
        adv = self.project(out.to(x.dtype), x, eps, lower, upper)
        # A point found on the boundary can tie there: judged again in the batch the caller gave, it may read as
        # its own class. Such a row comes back unchanged, so a changed row is always a misclassified one.
        with torch.no_grad():
            kept = self.forward(adv).argmax(1) == y
        return torch.where(kept.view(-1, *[1] * (x.dim() - 1)), x, adv)

    def _run(
        self,
        x0: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor,
        start: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """FAB towards `target` from `start`: per row the closest misclassified point found and its norm (inf if
        none)."""
        shape, flat = x0.shape, x0.flatten(1)
        lo, hi = lo.flatten(1), hi.flatten(1)
        x1 = start.flatten(1)
        best, best_norm = flat.clone(), torch.full((len(flat),), torch.inf, dtype=flat.dtype, device=flat.device)
        for _ in range(self.steps):
            gap, w = self._boundary(x1.view(shape), y, target)
            d1 = boundary_step(w, -gap, lo - x1, hi - x1, self.norm)
            d2 = boundary_step(w, -gap - (w * (flat - x1)).sum(1), lo - flat, hi - flat, self.norm)
            a1, a2 = self._size(d1).clamp_min(_MIN_STEP), self._size(d2).clamp_min(_MIN_STEP)
            alpha = (a1 / (a1 + a2)).clamp(0.0, ALPHA_MAX)[:, None]
            x1 = ((x1 + ETA * d1) * (1 - alpha) + (flat + ETA * d2) * alpha).clamp(lo, hi)
            with torch.no_grad():
                wrong = self.forward(x1.view(shape)).argmax(1) != y
            norm = self._size(x1 - flat)
            closer = wrong & (norm < best_norm)
            best = torch.where(closer[:, None], x1, best)
            best_norm = torch.where(closer, norm, best_norm)
            x1 = torch.where(wrong[:, None], flat + (x1 - flat) * BETA, x1)
        return best.view(shape), best_norm

    def _boundary(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z_target - z_y per row (negative while the true class wins) and its gradient w.r.t. `x`, flattened."""
        x = x.detach().requires_grad_(True)
        logits = self.forward(x)
        gap = logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(gap.sum(), x)
        return gap.detach(), grad.flatten(1)

    def _size(self, d: torch.Tensor) -> torch.Tensor:
        """Per-row norm of flattened `d` in the attack's norm."""
        return d.abs().amax(1) if self.norm == "inf" else d.norm(dim=1)
