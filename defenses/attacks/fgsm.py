"""FGSM (Goodfellow et al., 2015): one full-size step of the norm's steepest ascent from the clean input."""

from __future__ import annotations

import torch
from typing_extensions import override

from trainguard.defenses.attacks.base import Attack


class FGSM(Attack):
    """`x + eps * sign(grad)` for L-inf, `x + eps * grad / ||grad||` for L2, projected into bounds."""

    @override
    def _perturb(
        self, x: torch.Tensor, y: torch.Tensor, eps: float, lower: torch.Tensor, upper: torch.Tensor
    ) -> torch.Tensor:
        grad, _ = self.input_gradient(x, y)
        return self.project(self.step(x, grad, eps), x, eps, lower, upper)
