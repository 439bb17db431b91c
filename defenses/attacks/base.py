"""The contract every attack shares: eps-ball and bounds projection, eval-mode crafting, input-only gradients.

An attack is bound to a model (torchattacks style) and called on a batch: `x_adv = attack(x, y)`. Results stay
within `eps` of `x` (L-inf or L2) and within `bounds`; the model is crafted against in eval mode and restored
afterwards; gradients are taken w.r.t. the input only, so parameter `.grad` (e.g. accumulated by Lightning) and
BatchNorm statistics are left untouched. Random starts draw from a seedable `torch.Generator` on the input's device.
Forward passes run at the attack's crafting precision, `torch.autocast` at its `crafting_precision` dtype (None:
float32, whatever autocast encloses the call); the perturbation, the steps and the projection stay in the input's dtype.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Literal, TypedDict

import torch
from torch import nn
from torch.nn import functional as F

from trainguard.defenses.attacks.bounds import Bound, Bounds, RangeCheck
from trainguard.defenses.errors import AttackConfigError
from trainguard.defenses.task import Task, as_task

Norm = Literal["inf", "2"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ForwardFn = Callable[[torch.Tensor], torch.Tensor]


class AttackKeywords(TypedDict, total=False):
    """The keyword options of `Attack.__init__` besides `eps`, which every attack passes on to it unchanged."""

    norm: str | float
    bounds: tuple[Bound, Bound] | None
    loss: LossFn | None
    task: Task | str | None
    targeted: bool
    forward: ForwardFn | None
    seed: int | None
    generator: torch.Generator | None
    crafting_precision: torch.dtype | None
    defer_range_check: bool


_TINY = 1e-12
_CRAFTING_DTYPES = (torch.float16, torch.bfloat16)


def parse_norm(norm: str | float) -> Norm:
    """Normalises `"inf"`, `"linf"`, `float("inf")`, `2`, `"l2"` to `"inf"` or `"2"`."""
    text = str(norm).lower().removeprefix("l")
    if text in ("inf", "infinity"):
        return "inf"
    if text in ("2", "2.0"):
        return "2"
    raise AttackConfigError(f"norm must be 'inf' or '2', got {norm!r}")


def sum_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy: per-sample input gradients that do not shrink with the batch size."""
    return F.cross_entropy(logits, target, reduction="sum")


@contextlib.contextmanager
def crafting_mode(model: nn.Module) -> Iterator[None]:
    """Puts every submodule in eval mode (BatchNorm uses running stats, Dropout is off), restores each flag after."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


class Attack(ABC):
    """An evasion attack bound to `model`; subclasses implement `_perturb` on a detached, in-bounds batch.

    It maximises `loss(outputs, y)` (default: the `task`'s summed per-sample loss, cross-entropy for classification).
    `defer_range_check=True` (for training loops) reads each batch's bounds check at the next call or at
    `range_check.raise_pending()`, so crafting never waits for the device.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float,
        norm: str | float = "inf",
        bounds: tuple[Bound, Bound] | None = (0.0, 1.0),
        loss: LossFn | None = None,
        task: Task | str | None = None,
        targeted: bool = False,
        forward: ForwardFn | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        crafting_precision: torch.dtype | None = None,
        defer_range_check: bool = False,
    ) -> None:
        if not math.isfinite(eps) or eps < 0:
            raise AttackConfigError(f"eps must be a finite number >= 0, got {eps!r}")
        if crafting_precision is not None and crafting_precision not in _CRAFTING_DTYPES:
            raise AttackConfigError(
                f"crafting_precision must be torch.float16, torch.bfloat16 or None, got {crafting_precision!r}"
            )
        self.model = model
        self.eps = float(eps)
        self.norm = parse_norm(norm)
        self._bounds = Bounds(bounds)
        self.range_check = RangeCheck(deferred=defer_range_check)
        self.task = as_task(task)
        self.loss = loss or self.task.attack_loss
        self.targeted = targeted
        self.forward = forward or model
        self.seed = seed
        self._generator = generator
        self.crafting_precision = crafting_precision

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, eps: float | None = None) -> torch.Tensor:
        """Adversarial version of `x` (same shape, dtype, device); `y` are true labels, or targets if `targeted`."""
        eps = self.eps if eps is None else float(eps)
        if not math.isfinite(eps) or eps < 0:
            raise AttackConfigError(f"eps must be a finite number >= 0, got {eps!r}")
        x = x.detach()
        lower, upper = self._bounds.like(x)
        self.range_check(x, lower, upper)
        if eps == 0 or x.numel() == 0:
            return x.clone()
        with crafting_mode(self.model), torch.autocast(x.device.type, enabled=False), torch.enable_grad():
            x_adv = self._perturb(x, y.detach(), eps, lower, upper)
        return x_adv.detach()

    @abstractmethod
    def _perturb(
        self, x: torch.Tensor, y: torch.Tensor, eps: float, lower: torch.Tensor, upper: torch.Tensor
    ) -> torch.Tensor:
        """Crafts the adversarial batch; `x` is detached and within [lower, upper]."""

    def generator(self, device: torch.device) -> torch.Generator:
        """The attack's random generator on `device` (created from `seed`, or from torch's global RNG, on first use)."""
        if self._generator is None or self._generator.device != device:
            seed = self.seed if self.seed is not None else int(torch.randint(2**62, (1,)).item())
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(seed)
        return self._generator

    def reset_generator(self) -> None:
        """Forgets the generator: the next random start draws again from `seed` (same starts at every evaluation)."""
        self._generator = None

    def at_crafting_precision(self, device: torch.device) -> torch.autocast:
        """The autocast region forward passes run in: the attack's `crafting_precision` dtype, or none (float32)."""
        return torch.autocast(device.type, dtype=self.crafting_precision, enabled=self.crafting_precision is not None)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the model in eval mode at the attack's crafting precision, without autograd (e.g. on a crafted
        batch)."""
        with torch.no_grad(), crafting_mode(self.model), self.at_crafting_precision(x.device):
            return self.forward(x)

    def input_gradient(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of the crafting loss w.r.t. `x` only (ascent direction; descent if targeted), and the logits."""
        x = x.detach().requires_grad_(True)
        with self.at_crafting_precision(x.device):
            logits = self.forward(x)
            loss = self.loss(logits, y)
        if loss.dim() > 0:
            loss = loss.sum()
        (grad,) = torch.autograd.grad(loss, x)
        return (-grad if self.targeted else grad), logits.detach()

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size: float | torch.Tensor) -> torch.Tensor:
        """One steepest-ascent step of the attack's norm: sign for L-inf, unit L2 direction for L2 (`step_size` may
        be per sample, shaped to broadcast over the batch)."""
        if self.norm == "inf":
            return x_adv + step_size * grad.sign()
        return x_adv + step_size * grad / _per_sample_l2(grad).clamp_min(_TINY)

    def project(
        self, x_adv: torch.Tensor, x: torch.Tensor, eps: float, lower: torch.Tensor, upper: torch.Tensor
    ) -> torch.Tensor:
        """Into the eps-ball around `x`, then into bounds (clamping never moves a point away from an in-bounds `x`)."""
        delta = x_adv - x
        if self.norm == "inf":
            delta = delta.clamp(-eps, eps)
        else:
            delta = delta * (eps / _per_sample_l2(delta).clamp_min(_TINY)).clamp(max=1.0)
        return torch.minimum(torch.maximum(x + delta, lower), upper)

    def random_start(
        self, x: torch.Tensor, eps: float, lower: torch.Tensor, upper: torch.Tensor, scale: float = 1.0
    ) -> torch.Tensor:
        """A uniform random point of the `scale * eps` ball around `x`, clamped into bounds."""
        gen = self.generator(x.device)
        radius = scale * eps
        if self.norm == "inf":
            delta = (torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1) * radius
        else:
            direction = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            direction = direction / _per_sample_l2(direction).clamp_min(_TINY)
            dims = x[0].numel()
            u = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=gen, device=x.device, dtype=x.dtype)
            delta = direction * radius * u.pow(1.0 / dims)
        return torch.minimum(torch.maximum(x + delta, lower), upper)

    def state_dict(self) -> dict[str, object]:
        """The generator state (None before first use), so a resumed run draws the same random starts."""
        if self._generator is None:
            return {"generator": None, "device": None}
        return {"generator": self._generator.get_state(), "device": str(self._generator.device)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restores a generator saved by `state_dict`."""
        generator = state.get("generator")
        if generator is None:
            return
        if not isinstance(generator, torch.Tensor):
            raise AttackConfigError(
                f"attack state: the generator state must be a tensor, got {type(generator).__name__}"
            )
        device = torch.device(str(state["device"]))
        self._generator = torch.Generator(device=device)
        self._generator.set_state(generator)


def _per_sample_l2(t: torch.Tensor) -> torch.Tensor:
    norms: torch.Tensor = t.flatten(1).norm(dim=1)  # Tensor.norm is unannotated
    return norms.view(-1, *([1] * (t.dim() - 1)))
