"""`AdversarialTraining`: one callback turns an unmodified LightningModule's training into adversarial training.

Before each `training_step` (Lightning's `on_train_batch_start`, which receives the very batch object that
`training_step` gets next) the callback crafts adversarial inputs against the current model and puts them into the
batch in place: a new tensor in lists and dicts, overwritten values in immutable tuples. Crafting runs the module
in eval mode, in the input's dtype outside any autocast, and differentiates w.r.t. the inputs only, so mixed
precision, gradient accumulation (parameter `.grad` untouched) and DDP (purely local work, no collective) are safe.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch

from trainguard.defenses.attacks import ATTACKS, crafting_mode, make_attack, parse_norm
from trainguard.defenses.attacks.base import Attack, Bound, LossFn
from trainguard.defenses.attacks.batches import BatchKeys, Key
from trainguard.defenses.errors import AttackConfigError

ModuleForward = Callable[[pl.LightningModule, torch.Tensor], torch.Tensor]


class AdversarialTraining(pl.Callback):
    """Replaces the inputs of each training batch (or a random fraction `ratio` of its rows) with adversarial ones.

    `attack` is `"pgd"`, `"fgsm"` or `"fgsm-rs"`; `eps` is warmed up linearly over the first `warmup_epochs`
    epochs (step by step); `step_size` scales with the warmed-up eps. `loss(logits, target)` is what the attack
    maximises (default: summed cross-entropy); `forward(module, x)` how logits are obtained (default: `module(x)`).
    `input_key`/`target_key` locate the tensors in dict batches (tuples/lists default to positions 0 and 1).
    Logs `adv/eps` (mean over the epoch's rows) and `adv/success` (fraction of attacked rows the model, in eval
    mode, misclassifies after the attack; summed over DDP ranks) once per epoch; `log_success=False` saves the
    extra forward pass that success costs.
    """

    def __init__(
        self,
        attack: str = "pgd",
        *,
        eps: float,
        steps: int = 10,
        step_size: float | None = None,
        norm: str | float = "inf",
        ratio: float = 1.0,
        bounds: tuple[Bound, Bound] = (0.0, 1.0),
        loss: LossFn | None = None,
        warmup_epochs: float = 0.0,
        input_key: Key | None = None,
        target_key: Key | None = None,
        random_start: bool = True,
        forward: ModuleForward | None = None,
        seed: int | None = None,
        log_success: bool = True,
    ) -> None:
        if attack.lower() not in ATTACKS:
            raise AttackConfigError(f"unknown attack {attack!r}: choose one of {', '.join(ATTACKS)}")
        if not 0.0 <= ratio <= 1.0:
            raise AttackConfigError(f"ratio must be within [0, 1], got {ratio!r}")
        if not math.isfinite(eps) or eps < 0:
            raise AttackConfigError(f"eps must be a finite number >= 0, got {eps!r}")
        if warmup_epochs < 0:
            raise AttackConfigError(f"warmup_epochs must be >= 0, got {warmup_epochs!r}")
        self.attack_name = attack.lower()
        self.eps = float(eps)
        self.steps = steps
        self.step_size = step_size
        self.norm = parse_norm(norm)
        self.ratio = float(ratio)
        self.bounds = bounds
        self.loss = loss
        self.warmup_epochs = float(warmup_epochs)
        self.keys = BatchKeys(input_key, target_key)
        self.random_start = random_start
        self.forward = forward
        self.seed = seed
        self.log_success = log_success
        self.attack: Attack | None = None
        self._pending_state: dict[str, Any] | None = None
        self._eps_sum, self._rows = 0.0, 0
        self._hits = torch.zeros(2)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(attack=self.attack_name, eps=self.eps, norm=self.norm, ratio=self.ratio)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Each rank draws its own random starts; with seed=None the seed comes from torch's (seed_everything) RNG.
        base = self.seed if self.seed is not None else int(torch.randint(2**62, (1,)).item())
        forward = self.forward
        self.attack = make_attack(
            self.attack_name,
            pl_module,
            eps=self.eps,
            steps=self.steps,
            step_size=self.step_size,
            random_start=self.random_start,
            norm=self.norm,
            bounds=self.bounds,
            loss=self.loss,
            forward=(lambda x: forward(pl_module, x)) if forward is not None else None,
            seed=base + trainer.global_rank,
        )
        if self._pending_state is not None:
            self.attack.load_state_dict(self._pending_state)
            self._pending_state = None

    def current_eps(self, trainer: pl.Trainer, batch_idx: int) -> float:
        """eps after linear warm-up: reaches `eps` at the end of epoch `warmup_epochs` (from the trainer's progress)."""
        if self.warmup_epochs <= 0:
            return self.eps
        batches = trainer.num_training_batches
        within = (batch_idx + 1) / batches if math.isfinite(batches) and batches > 0 else 1.0
        return self.eps * min(1.0, (trainer.current_epoch + within) / self.warmup_epochs)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eps_sum, self._rows = 0.0, 0
        self._hits = torch.zeros(2, device=pl_module.device)  # misclassified (or on-target) rows, attacked rows

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.attack is None:
            raise AttackConfigError("AdversarialTraining was not set up: attach it to the Trainer's callbacks")
        x, y = self.keys.get(batch)
        eps = self.current_eps(trainer, batch_idx)
        n = x.shape[0]
        self._eps_sum += eps * n
        self._rows += n
        count = n if self.ratio == 1.0 else round(self.ratio * n)
        if eps == 0 or count == 0:
            return
        if count < n:
            rows = torch.randperm(n, generator=self.attack.generator(x.device), device=x.device)[:count]
            x_adv = self.attack(x[rows], y[rows], eps=eps)
            x_new = x.detach().clone()
            x_new[rows] = x_adv
            y_attacked = y[rows]
        else:
            x_new = x_adv = self.attack(x, y, eps=eps)
            y_attacked = y
        if self.log_success and not y_attacked.is_floating_point():
            self._hits += torch.stack([self._successes(pl_module, x_adv, y_attacked), self._hits.new_tensor(count)])
        self.keys.set_input(batch, x_new)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # One log call per metric and epoch: per-step `self.log` costs more than a forward pass of a small model.
        hits = trainer.strategy.reduce(self._hits, reduce_op="sum")  # every rank joins, even one without batches
        if self._rows > 0:
            pl_module.log("adv/eps", self._eps_sum / self._rows, on_step=False, on_epoch=True)
        if hits[1] > 0:
            pl_module.log("adv/success", hits[0] / hits[1], on_step=False, on_epoch=True)

    def _successes(self, pl_module: pl.LightningModule, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert self.attack is not None
        with torch.no_grad(), crafting_mode(pl_module), torch.autocast(x_adv.device.type, enabled=False):
            predicted = self.attack.forward(x_adv).argmax(dim=1)
        hit = predicted == y if self.attack.targeted else predicted != y
        return hit.sum().to(self._hits.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"attack": self.attack.state_dict() if self.attack is not None else {"generator": None}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.attack is not None:
            self.attack.load_state_dict(state_dict["attack"])
        else:
            self._pending_state = state_dict["attack"]
