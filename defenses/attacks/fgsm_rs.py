"""FGSM with a random start, the attack of "fast" adversarial training (Wong, Rice & Kolter, 2020)."""

from __future__ import annotations

from typing import Unpack

import torch
from torch import nn
from typing_extensions import override

from trainguard.defenses.attacks.base import Attack, AttackKeywords
from trainguard.defenses.errors import AttackConfigError


class FGSMRandomStart(Attack):
    """A uniform random start in the eps-ball, then one step of `alpha * eps` (default 1.25), projected back."""

    def __init__(self, model: nn.Module, *, eps: float, alpha: float = 1.25, **kwargs: Unpack[AttackKeywords]) -> None:
        super().__init__(model, eps=eps, **kwargs)
        if alpha <= 0:
            raise AttackConfigError(f"alpha must be > 0, got {alpha!r}")
        self.alpha = float(alpha)

    @override
    def _perturb(
        self, x: torch.Tensor, y: torch.Tensor, eps: float, lower: torch.Tensor, upper: torch.Tensor
    ) -> torch.Tensor:
        start = self.random_start(x, eps, lower, upper)
        grad, _ = self.input_gradient(start, y)
        return self.project(self.step(start, grad, self.alpha * eps), x, eps, lower, upper)
