"""TRADES (Zhang et al., 2019) without rewriting the user's module: a wrapper LightningModule.

TRADES trains on `CE(f(x), y) + beta * KL(f(x) || f(x_adv))`, where `x_adv` maximises that KL term within the
eps-ball. The extra loss term cannot be injected by a callback, so `TRADES(module, eps=...)` wraps an unmodified
classifier module and is what you pass to `Trainer.fit`:

    trainer.fit(TRADES(DigitsClassifier(), eps=0.2, beta=6.0), datamodule)

The wrapper's `training_step` computes the TRADES loss from `module(x)` logits; `validation_step`, `test_step`,
`predict_step` and `configure_optimizers` are the wrapped module's own (its `self.log` calls work). Other hooks of
the wrapped module are not called. Its weights live under `module.` in the wrapper's checkpoint (with the
attack's generator state, so a resumed run draws the same starts); save `wrapper.module.state_dict()` to get the
bare model.

A training step costs the clean forward, the attack's `steps` forward-backward passes and the adversarial forward:
the attack maximises the divergence from the clean training forward's (detached) distribution instead of
computing its own clean forward. It crafts under the trainer's autocast unless `crafting="fp32"`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from trainguard.defenses.attacks.base import Attack, Bound
from trainguard.defenses.attacks.batches import BatchKeys, Key
from trainguard.defenses.attacks.precision import crafting_autocast, parse_crafting
from trainguard.defenses.errors import AttackConfigError

ModuleForward = Callable[[pl.LightningModule, torch.Tensor], torch.Tensor]


def _kl_to_clean(logits_adv: torch.Tensor, clean_probs: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(logits_adv, dim=1), clean_probs, reduction="sum")


class TradesAttack(Attack):
    """TRADES' inner maximisation: PGD on KL(p || f(x')) from a Gaussian start of 0.001 eps (the KL is flat at x).

    Called as `attack(x, p)` with `p` the clean class distribution (rows of probabilities), or as `attack(x, y)`
    with labels, in which case `p = softmax(f(x))` costs one eval-mode forward.
    """

    def __init__(
        self, model: torch.nn.Module, *, eps: float, steps: int = 10, step_size: float | None = None, **kw: Any
    ) -> None:
        super().__init__(model, eps=eps, loss=_kl_to_clean, **kw)
        if steps < 1:
            raise AttackConfigError(f"steps must be >= 1, got {steps!r}")
        self.steps = steps
        self.step_size = step_size

    def _perturb(
        self, x: torch.Tensor, y: torch.Tensor, eps: float, lower: torch.Tensor, upper: torch.Tensor
    ) -> torch.Tensor:
        clean_probs = y if y.is_floating_point() else F.softmax(self.predict(x).float(), dim=1)
        gen = self.generator(x.device)
        start = x + 0.001 * eps * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        x_adv = self.project(start, x, eps, lower, upper)
        alpha = self.step_size if self.step_size is not None else 2.5 * eps / self.steps
        for _ in range(self.steps):
            grad, _ = self.input_gradient(x_adv, clean_probs)
            x_adv = self.project(self.step(x_adv, grad, alpha), x, eps, lower, upper)
        return x_adv


class TRADES(pl.LightningModule):
    """Trains the wrapped classifier `module` with the TRADES objective; `beta` trades clean for robust accuracy.

    `forward(module, x)` gives logits (default `module(x)`); `input_key`/`target_key` locate the tensors of dict
    batches. Logs `train/loss`, `train/trades_natural`, `train/trades_robust` once per epoch.
    """

    def __init__(
        self,
        module: pl.LightningModule,
        *,
        eps: float,
        beta: float = 6.0,
        steps: int = 10,
        step_size: float | None = None,
        norm: str | float = "inf",
        bounds: tuple[Bound, Bound] = (0.0, 1.0),
        input_key: Key | None = None,
        target_key: Key | None = None,
        forward: ModuleForward | None = None,
        seed: int | None = None,
        crafting: str = "trainer",
    ) -> None:
        super().__init__()
        if beta < 0:
            raise AttackConfigError(f"beta must be >= 0, got {beta!r}")
        self.module = module
        self.beta = float(beta)
        self.keys = BatchKeys(input_key, target_key)
        self._forward = forward
        self.crafting = parse_crafting(crafting)
        self.attack = TradesAttack(
            module, eps=eps, steps=steps, step_size=step_size, norm=norm, bounds=bounds, forward=self.forward, seed=seed
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(self.module, x) if self._forward is not None else self.module(x)

    def setup(self, stage: str) -> None:
        self.attack.autocast = crafting_autocast(self.crafting, self.trainer)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self.keys.get(batch)
        logits = self(x)
        clean_probs = F.softmax(logits.float(), dim=1)
        x_adv = self.attack(x, clean_probs.detach())
        natural = F.cross_entropy(logits, y)
        robust = F.kl_div(F.log_softmax(self(x_adv), dim=1), clean_probs, reduction="batchmean")
        loss = natural + self.beta * robust
        n = x.shape[0]
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        self.log("train/trades_natural", natural, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        self.log("train/trades_robust", robust, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        return loss

    def _delegate(self, hook: str, *args: Any) -> Any:
        # The trainer only tracks the wrapper's current hook; the wrapped module's `self.log` needs it too.
        self.module._current_fx_name = self._current_fx_name
        return getattr(self.module, hook)(*args)

    def validation_step(self, batch: Any, batch_idx: int, *args: Any) -> Any:
        return self._delegate("validation_step", batch, batch_idx, *args)

    def test_step(self, batch: Any, batch_idx: int, *args: Any) -> Any:
        return self._delegate("test_step", batch, batch_idx, *args)

    def predict_step(self, batch: Any, batch_idx: int, *args: Any) -> Any:
        return self._delegate("predict_step", batch, batch_idx, *args)

    def configure_optimizers(self) -> Any:
        return self.module.configure_optimizers()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["trades_attack"] = self.attack.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "trades_attack" in checkpoint:
            self.attack.load_state_dict(checkpoint["trades_attack"])
