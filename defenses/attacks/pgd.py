"""PGD (Madry et al., 2018): iterated steepest-ascent steps projected onto the eps-ball, L-inf or L2."""

from __future__ import annotations

from typing import Unpack

import torch
from torch import nn
from typing_extensions import override

from trainguard.defenses.attacks.base import Attack, AttackKeywords
from trainguard.defenses.errors import AttackConfigError


class PGD(Attack):
    """`steps` steps of `step_size` (default `2.5 * eps / steps`), from a uniform random start unless disabled."""

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
        **kwargs: Unpack[AttackKeywords],
    ) -> None:
        super().__init__(model, eps=eps, **kwargs)
        if steps < 1:
            raise AttackConfigError(f"steps must be >= 1, got {steps!r}")
        if step_size is not None and step_size <= 0:
            raise AttackConfigError(f"step_size must be > 0, got {step_size!r}")
        self.steps = int(steps)
        self.step_size = step_size
        self.random_start_enabled = random_start

    def step_size_for(self, eps: float) -> float:
        """The configured step size, or Madry's `2.5 * eps / steps` (scales with a warmed-up eps)."""
        if self.step_size is None:
            return 2.5 * eps / self.steps
        return self.step_size * eps / self.eps if self.eps > 0 else self.step_size

    @override
    def _perturb(
        self, x: torch.Tensor, y: torch.Tensor, eps: float, lower: torch.Tensor, upper: torch.Tensor
    ) -> torch.Tensor:
        x_adv = self.random_start(x, eps, lower, upper) if self.random_start_enabled else x
        alpha = self.step_size_for(eps)
        for _ in range(self.steps):
            grad, _ = self.input_gradient(x_adv, y)
            x_adv = self.project(self.step(x_adv, grad, alpha), x, eps, lower, upper)
        return x_adv
