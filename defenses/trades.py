"""TRADES (Zhang et al., 2019) without rewriting the user's module: a wrapper LightningModule.

TRADES trains on `CE(f(x), y) + beta * KL(f(x) || f(x_adv))`, where `x_adv` maximises that KL term within the
eps-ball. For other tasks the natural term is the task's loss and the divergence follows the outputs: BCE between
the adversarial and the clean sigmoid outputs for multilabel (the per-label KL plus a constant), squared error
between adversarial and clean outputs for regression; a custom task has no divergence and is refused.

The extra loss term cannot be injected by a callback, so `TRADES(module, eps=...)` wraps an unmodified module and is
what you pass to `Trainer.fit`:

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

from typing import Any

import pytorch_lightning as pl
import torch
from typing_extensions import override

from trainguard.defenses.attacks.base import Attack
from trainguard.defenses.attacks.batches import Key
from trainguard.defenses.attacks.bounds import Bound
from trainguard.defenses.attacks.options import AttackOptions
from trainguard.defenses.attacks.precision import crafting_autocast
from trainguard.defenses.errors import AttackConfigError
from trainguard.defenses.forward import BatchForward, ModuleForward
from trainguard.defenses.task import BUILT_IN, Task, as_task


class TradesAttack(Attack):
    """TRADES' inner maximisation: PGD on the task's divergence from the clean outputs (KL(p || f(x')) for
    classification) from a Gaussian start of 0.001 eps (the divergence is flat at x).

    Called as `attack(x, p)` with `p` the clean reference (`Task.clean_reference`: class probabilities, label
    probabilities or regression outputs), or, for classification, as `attack(x, y)` with integer labels, in which
    case `p = softmax(f(x))` costs one eval-mode forward.
    """

    def __init__(
        self, model: torch.nn.Module, *, eps: float, steps: int = 10, step_size: float | None = None, **kw: Any
    ) -> None:
        task = as_task(kw.pop("task", None))
        task.refuse_unless(BUILT_IN, "TRADES (a divergence between clean and adversarial outputs)")
        super().__init__(model, eps=eps, loss=task.divergence, task=task, **kw)
        if steps < 1:
            raise AttackConfigError(f"steps must be >= 1, got {steps!r}")
        self.steps = steps
        self.step_size = step_size

    @override
    def _perturb(
        self, x: torch.Tensor, y: torch.Tensor, eps: float, lower: torch.Tensor, upper: torch.Tensor
    ) -> torch.Tensor:
        clean_probs = y if y.is_floating_point() else self.task.clean_reference(self.predict(x))
        gen = self.generator(x.device)
        start = x + 0.001 * eps * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        x_adv = self.project(start, x, eps, lower, upper)
        alpha = self.step_size if self.step_size is not None else 2.5 * eps / self.steps
        for _ in range(self.steps):
            grad, _ = self.input_gradient(x_adv, clean_probs)
            x_adv = self.project(self.step(x_adv, grad, alpha), x, eps, lower, upper)
        return x_adv


class TRADES(pl.LightningModule):
    """Trains the wrapped `module` with the TRADES objective; `beta` trades clean for robust accuracy.

    `task` (default classification) sets the natural loss and the divergence. `forward(module, batch, x)` gives the
    outputs (default `module(x)`), reading extra model inputs from the batch; `input_key`/`target_key` locate the
    tensors of dict batches. `bounds` is the data's value range (required). The attack settings are kept as one
    `AttackOptions` (`options`). Logs `train/loss`, `train/trades_natural`, `train/trades_robust` once per epoch.
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
        bounds: tuple[Bound, Bound] | None = (0.0, 1.0),
        task: Task | str | None = None,
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
        self.options = AttackOptions.of(
            steps=steps,
            step_size=step_size,
            norm=norm,
            bounds=bounds,
            task=task,
            input_key=input_key,
            target_key=target_key,
            forward=forward,
            seed=seed,
            crafting=crafting,
        )
        self.task = self.options.task
        self.keys = self.options.keys
        self._forward = BatchForward(module, forward)
        self.attack = TradesAttack(
            module,
            eps=eps,
            steps=steps,
            step_size=step_size,
            norm=self.options.norm,
            bounds=self.options.bounds,
            task=self.task,
            forward=self._forward,
            seed=seed,
        )

    @override
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's own forward, so a `forward(module, batch, x)` hook handed the wrapper (as callbacks
        see it) calls the module as it would unwrapped."""
        return self.module(*args, **kwargs)

    @override
    def setup(self, stage: str) -> None:
        self.attack.autocast = crafting_autocast(self.options.crafting, self.trainer)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self.keys.get(batch)
        self.task.check_targets(y)
        n = x.shape[0]
        with self._forward.on(batch):
            outputs = self._forward(x)
            clean = self.task.clean_reference(outputs)
            x_adv = self.attack(x, clean)
            natural = self.task.sample_loss(outputs, y).mean()
            robust = self.task.divergence(self._forward(x_adv), clean) / n
        loss = natural + self.beta * robust
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        self.log("train/trades_natural", natural, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        self.log("train/trades_robust", robust, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        return loss

    def _delegate(self, hook: str, *args: Any) -> Any:
        # The trainer only tracks the wrapper's current hook; the wrapped module's `self.log` needs it too.
        self.module._current_fx_name = self._current_fx_name
        return getattr(self.module, hook)(*args)

    @override
    def validation_step(self, batch: Any, batch_idx: int, *args: Any) -> Any:
        return self._delegate("validation_step", batch, batch_idx, *args)

    @override
    def test_step(self, batch: Any, batch_idx: int, *args: Any) -> Any:
        return self._delegate("test_step", batch, batch_idx, *args)

    @override
    def predict_step(self, batch: Any, batch_idx: int, *args: Any) -> Any:
        return self._delegate("predict_step", batch, batch_idx, *args)

    @override
    def configure_optimizers(self) -> Any:
        return self.module.configure_optimizers()

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["trades_attack"] = self.attack.state_dict()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "trades_attack" in checkpoint:
            self.attack.load_state_dict(checkpoint["trades_attack"])
