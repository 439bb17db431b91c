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
computing its own clean forward. It crafts under the trainer's autocast unless `crafting_precision="fp32"`.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from typing_extensions import Unpack, override

from trainguard.defenses.attacks.base import Attack
from trainguard.defenses.attacks.options import AttackOptionKeywords, AttackOptions
from trainguard.defenses.attacks.precision import resolve_crafting_precision
from trainguard.defenses.errors import AttackConfigError
from trainguard.defenses.forward import BatchForward
from trainguard.defenses.task import BUILT_IN, as_task


class TradesAttack(Attack):
    """TRADES' inner maximisation: PGD on the task's divergence from the clean outputs.

    For classification that is KL(p || f(x')). It starts from a Gaussian of 0.001 eps around `x` (the divergence is
    flat at x). Called as `attack(x, p)` with `p` the clean reference (`Task.clean_reference`: class probabilities,
    label probabilities or regression outputs), or, for classification, as `attack(x, y)` with integer labels, in
    which case `p = softmax(f(x))` costs one eval-mode forward.

    Args:
        model: The module attacked.
        eps: The budget (finite, >= 0).
        steps: PGD iterations, >= 1.
        step_size: Each step's size; None: 2.5 eps / steps.
        **kw: The other `Attack` keywords (`norm`, `bounds`, `task`, `forward`, `seed`, `crafting_precision`, ...);
            the loss is always the task's divergence.

    Raises:
        AttackConfigError: `steps` < 1 or eps out of range.
        TaskMismatchError: A task without a divergence (a custom one).

    Example::

        attack = TradesAttack(model, eps=0.1, steps=10, bounds=(0.0, 1.0), seed=0)
        x_adv = attack(x, model(x).softmax(-1))
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

    Pass the wrapper to `Trainer.fit`: its `training_step` trains `module` (in place) on the natural loss plus
    `beta` times the divergence between clean and adversarial outputs; validation, test, predict steps and the
    optimizers are the module's own. Logs `train/loss`, `train/trades_natural`, `train/trades_robust` once per
    epoch.

    Args:
        module: The LightningModule trained (unmodified).
        eps: The inner maximisation's budget.
        beta: The weight of the robust (divergence) term, >= 0.
        options: The attack settings as one `AttackOptions` (its `loss` must be None: TRADES maximises its
            divergence); or pass them as keywords instead.
        **settings: The attack settings as keywords (`AttackOptionKeywords` except `loss`: `steps` (10),
            `step_size`, `norm`, `bounds` (the data's value range, required), `task` (the natural loss and the
            divergence; default classification), `input_key`, `target_key`, `forward`, `seed`,
            `crafting_precision`). Kept as `options`.

    Raises:
        AttackConfigError: `beta` < 0, an attack setting out of range, a `loss`, or both `options` and attack
            keywords.
        TaskMismatchError: An unknown task name, or a task without a divergence (a custom one).
        TypeError: A keyword that is no argument and no attack setting.

    Example::

        from pytorch_lightning import Trainer
        from trainguard.defenses import TRADES

        trades = TRADES(DigitsClassifier(), eps=0.2, beta=6.0, steps=10)
        Trainer(max_epochs=10).fit(trades, datamodule)
        torch.save(trades.module.state_dict(), "model.pt")
    """

    def __init__(
        self,
        module: pl.LightningModule,
        *,
        eps: float,
        beta: float = 6.0,
        options: AttackOptions | None = None,
        **settings: Unpack[AttackOptionKeywords],
    ) -> None:
        super().__init__()
        if beta < 0:
            raise AttackConfigError(f"beta must be >= 0, got {beta!r}")
        self.module = module
        self.beta = float(beta)
        self.options = AttackOptions.given(options, settings)
        if self.options.loss is not None:
            raise AttackConfigError("TRADES maximises the divergence from the clean outputs: it takes no loss")
        self.task = self.options.task
        self.keys = self.options.keys
        self._forward = BatchForward(module, self.options.forward)
        self.attack = TradesAttack(
            module,
            eps=eps,
            steps=self.options.steps,
            step_size=self.options.step_size,
            norm=self.options.norm,
            bounds=self.options.bounds,
            task=self.task,
            forward=self._forward,
            seed=self.options.seed,
        )

    @override
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's own forward, so a `forward(module, batch, x)` hook handed the wrapper (as callbacks
        see it) calls the module as it would unwrapped."""
        return self.module(*args, **kwargs)

    @override
    def setup(self, stage: str) -> None:
        self.attack.crafting_precision = resolve_crafting_precision(self.options.crafting_precision, self.trainer)

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
