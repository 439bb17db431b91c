"""`AdversarialTraining`: one callback turns an unmodified LightningModule's training into adversarial training.

Before each `training_step` (Lightning's `on_train_batch_start`, which receives the very batch object that
`training_step` gets next) the callback crafts adversarial inputs against the current model and puts them into the
batch in place: a new tensor in lists and dicts, overwritten values in immutable tuples. Crafting runs the module
in eval mode at the crafting precision: under the autocast of the trainer's precision plugin (or in float32 with
`crafting_precision="fp32"`); it keeps the perturbation in the input's dtype and differentiates w.r.t. the inputs
only, so mixed precision, gradient accumulation (parameter `.grad` untouched) and DDP (purely local work, no
collective) are safe. Nothing per batch
waits for the device: a batch outside the attack's bounds stops the fit at the next batch (or at the epoch's end).

With FGSM-RS ("fast" adversarial training, Wong et al. 2020) an `OverfittingGuard` runs by default: PGD accuracy
on a fixed clean training batch after each epoch; on catastrophic overfitting (a drop of more than 0.2 from the best
epoch) training stops and the best epoch's weights come back.

`adv/success` is read from the logits of the training forward on the adversarial batch (a forward hook on the
module that matches the batch's input tensor), not from an extra forward pass: the attack's own last logits belong
to the point before its last step (and, for FGSM, to the clean or random-start point), while the training forward
sees exactly the crafted batch (in train mode: with batch norm or dropout the count can differ slightly from an
eval-mode one). When `training_step` never calls the module on that tensor, an eval-mode forward
before the backward pass (same weights as the crafting) counts the successes instead, with a warning. A success is
an attacked row the task does not count as correct (`Task.correct`: wrong class, wrong labels, error beyond tolerance).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.hooks import RemovableHandle
from typing_extensions import Unpack, override

from trainguard.defenses.attacks import ATTACKS, make_attack
from trainguard.defenses.attacks.base import Attack
from trainguard.defenses.attacks.options import AttackOptionKeywords, AttackOptions, AttackSettings
from trainguard.defenses.errors import AttackConfigError
from trainguard.defenses.forward import BatchForward, batch_rows
from trainguard.defenses.overfitting import OverfittingGuard


@dataclass(frozen=True)
class _Watch:
    """An adversarial batch awaiting its training forward: the tensor `training_step` gets, the attacked rows."""

    batch_input: torch.Tensor
    batch: Any
    x_adv: torch.Tensor
    target: torch.Tensor
    rows: torch.Tensor | None
    hook: RemovableHandle


class AdversarialTraining(AttackSettings, pl.Callback):
    """Replaces the inputs of each training batch (or a random fraction `ratio` of its rows) with adversarial ones.

    Before each `training_step` the callback crafts adversarial inputs against the current model (in eval mode, at
    the crafting precision) and puts them into the batch in place. It logs `adv/eps` (mean over the epoch's rows)
    and `adv/success` (fraction of attacked rows the training forward gets wrong; summed over DDP ranks) once per
    epoch, and `adv/guard_acc` while an `OverfittingGuard` runs.

    Args:
        attack: `"pgd"`, `"fgsm"` or `"fgsm-rs"` (FGSM with a random start, "fast" adversarial training).
        eps: The attack's budget, warmed up linearly over the first `warmup_epochs` epochs (step by step); the
            step size scales with the warmed-up eps.
        ratio: The fraction of each batch's rows attacked, in [0, 1]. 1.0 attacks every row, so no clean loss is
            trained on: a warning says clean accuracy may drop and suggests 0.5 (the cycle config's default).
        warmup_epochs: Epochs (>= 0, fractions allowed) over which eps grows from 0.
        random_start: Whether PGD starts from a random point of the eps-ball.
        log_success: Whether to log `adv/success`, read from the training forward's logits (a forward hook on the
            module; without a module call on the batch's input tensor, an extra forward with a warning).
        overfitting_guard: Whether an `OverfittingGuard` stops training at catastrophic overfitting and restores
            the best epoch; None: on for `"fgsm-rs"` only. Its PGD runs at the full eps with `guard_steps` steps
            and shares the other attack settings.
        guard_steps: The guard's PGD steps.
        options: The attack settings as one `AttackOptions` (e.g. shared with `RobustAccuracy`); or pass them as
            keywords instead.
        **settings: The attack settings as keywords (`AttackOptionKeywords`: `steps` (10), `step_size`, `norm`,
            `bounds` (the data's value range, (0, 1) by default: set it to match the data), `loss`, `task`,
            `input_key`, `target_key`, `forward`, `seed`, `crafting_precision` (`"trainer"`: the autocast of the
            trainer's precision, e.g. bf16 with `precision="bf16-mixed"`; `"fp32"`)). Kept as `options`.

    Raises:
        AttackConfigError: An unknown attack, `ratio` outside [0, 1], eps or `warmup_epochs` negative, an attack
            setting out of range, or both `options` and attack keywords.
        TaskMismatchError: An unknown task name.
        TypeError: A keyword that is no argument and no attack setting.

    Example::

        from pytorch_lightning import Trainer
        from trainguard.defenses import AdversarialTraining

        adversarial = AdversarialTraining("pgd", eps=8 / 255, steps=7, ratio=0.5, warmup_epochs=2)
        Trainer(max_epochs=10, callbacks=[adversarial]).fit(model, datamodule)
    """

    def __init__(
        self,
        attack: str = "pgd",
        *,
        eps: float,
        ratio: float = 1.0,
        warmup_epochs: float = 0.0,
        random_start: bool = True,
        log_success: bool = True,
        overfitting_guard: bool | None = None,
        guard_steps: int = 5,
        options: AttackOptions | None = None,
        **settings: Unpack[AttackOptionKeywords],
    ) -> None:
        if attack.lower() not in ATTACKS:
            raise AttackConfigError(f"unknown attack {attack!r}: choose one of {', '.join(ATTACKS)}")
        if not 0.0 <= ratio <= 1.0:
            raise AttackConfigError(f"ratio must be within [0, 1], got {ratio!r}")
        if not math.isfinite(eps) or eps < 0:
            raise AttackConfigError(f"eps must be a finite number >= 0, got {eps!r}")
        if warmup_epochs < 0:
            raise AttackConfigError(f"warmup_epochs must be >= 0, got {warmup_epochs!r}")
        self.options = AttackOptions.given(options, settings)
        if ratio == 1.0 and eps > 0:
            warnings.warn(
                f"adversarial training with ratio={ratio:g} trains on attacked rows only (no clean loss): clean "
                "accuracy may drop; ratio=0.5 keeps half of each batch clean",
                UserWarning,
                stacklevel=2,
            )
        self.attack_name = attack.lower()
        self.eps = float(eps)
        self.ratio = float(ratio)
        self.warmup_epochs = float(warmup_epochs)
        self.random_start = random_start
        self.log_success = log_success
        guarded = self.attack_name == "fgsm-rs" if overfitting_guard is None else overfitting_guard
        guard_seed = self.seed if self.seed is not None else 0
        guard_options = replace(self.options, steps=guard_steps, step_size=None, seed=guard_seed)
        self.guard = OverfittingGuard(eps=self.eps, options=guard_options) if guarded else None
        self.attack: Attack | None = None
        self._forward: BatchForward | None = None
        self._watch: _Watch | None = None
        self._pending_state: dict[str, Any] | None = None
        self._eps_sum, self._rows = 0.0, 0
        self._hits = torch.zeros(())
        self._watched = 0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(attack=self.attack_name, eps=self.eps, norm=self.norm, ratio=self.ratio)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Each rank draws its own random starts; with seed=None the seed comes from torch's (seed_everything) RNG.
        base = self.seed if self.seed is not None else int(torch.randint(2**62, (1,)).item())
        self._forward = BatchForward(pl_module, self.forward)
        self.attack = make_attack(
            self.attack_name,
            pl_module,
            eps=self.eps,
            steps=self.steps,
            step_size=self.step_size,
            random_start=self.random_start,
            loss=self.loss,
            seed=base + trainer.global_rank,
            defer_range_check=True,
            **self.options.attack_arguments(self._forward, trainer),
        )
        if self._pending_state is not None:
            self.attack.load_state_dict(self._pending_state)
            self._pending_state = None
        if self.guard is not None:
            self.guard.setup(trainer, pl_module, stage)

    def current_eps(self, trainer: pl.Trainer, batch_idx: int) -> float:
        """eps after linear warm-up: reaches `eps` at the end of epoch `warmup_epochs` (from the trainer's progress)."""
        if self.warmup_epochs <= 0:
            return self.eps
        batches = trainer.num_training_batches
        within = (batch_idx + 1) / batches if math.isfinite(batches) and batches > 0 else 1.0
        return self.eps * min(1.0, (trainer.current_epoch + within) / self.warmup_epochs)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eps_sum, self._rows = 0.0, 0
        # Successes stay on the device and attacked rows on the host: counting never waits for the device.
        self._hits = torch.zeros((), device=pl_module.device)
        self._watched = 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.attack is None or self._forward is None:
            raise AttackConfigError("AdversarialTraining was not set up: attach it to the Trainer's callbacks")
        self._drop_watch()
        if self.guard is not None:
            self.guard.on_train_batch_start(trainer, pl_module, batch, batch_idx)  # holds a clean batch
        x, y = self.keys.get(batch)
        self.task.check_targets(y)
        eps = self.current_eps(trainer, batch_idx)
        n = x.shape[0]
        self._eps_sum += eps * n
        self._rows += n
        count = n if self.ratio == 1.0 else round(self.ratio * n)
        if eps == 0 or count == 0:
            return
        if count < n:
            rows = torch.randperm(n, generator=self.attack.generator(x.device), device=x.device)[:count]
            attacked = batch_rows(batch, rows, n)
            with self._forward.on(attacked):
                x_adv = self.attack(x[rows], y[rows], eps=eps)
            x_new = x.detach().clone()
            x_new[rows] = x_adv
            y_attacked = y[rows]
        else:
            attacked = batch
            with self._forward.on(attacked):
                x_new = x_adv = self.attack(x, y, eps=eps)
            y_attacked = y
        self.keys.set_input(batch, x_new)
        if self.log_success:
            self._watch = _Watch(
                batch_input=self.keys.get(batch)[0],
                batch=attacked,
                x_adv=x_adv,
                target=y_attacked,
                rows=rows if count < n else None,
                hook=pl_module.register_forward_hook(self._on_module_forward),
            )

    def _on_module_forward(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        watch = self._watch
        if watch is None or not args or not _same_storage(args[0], watch.batch_input):
            return
        if not (isinstance(output, torch.Tensor) and output.dim() >= 1 and len(output) == len(watch.batch_input)):
            return
        logits = output.detach() if watch.rows is None else output.detach()[watch.rows]
        self._count_successes(logits, watch)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        watch = self._watch
        if watch is None:
            return
        assert self.attack is not None and self._forward is not None
        rank_zero_warn(
            "AdversarialTraining: training_step did not call the module on the batch's input tensor, so adv/success "
            "costs an extra forward pass; call self(x) on the batch input or pass log_success=False"
        )
        with self._forward.on(watch.batch):
            self._count_successes(self.attack.predict(watch.x_adv), watch)

    def _count_successes(self, logits: torch.Tensor, watch: _Watch) -> None:
        assert self.attack is not None
        self._drop_watch()
        correct = self.task.correct(logits, watch.target)
        self._hits += (correct if self.attack.targeted else 1 - correct).sum()
        self._watched += len(watch.target)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.attack is not None:
            self.attack.range_check.raise_pending()
        # One log call per metric and epoch: per-step `self.log` costs more than a forward pass of a small model.
        counts = torch.stack([self._hits, self._hits.new_tensor(self._watched)])
        hits = trainer.strategy.reduce(counts, reduce_op="sum")  # every rank joins, even one without batches
        if self._rows > 0:
            pl_module.log("adv/eps", self._eps_sum / self._rows, on_step=False, on_epoch=True)
        if hits[1] > 0:
            pl_module.log("adv/success", hits[0] / hits[1], on_step=False, on_epoch=True)
        if self.guard is not None:
            self.guard.on_train_epoch_end(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._drop_watch()

    def _drop_watch(self) -> None:
        # Also drops the batch of a training_step that returned None (no backward) or raised: it was not trained on.
        if self._watch is not None:
            self._watch.hook.remove()
            self._watch = None

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"attack": self.attack.state_dict() if self.attack is not None else {"generator": None}}
        if self.guard is not None:
            state["guard"] = self.guard.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.guard is not None and "guard" in state_dict:
            self.guard.load_state_dict(state_dict["guard"])
        if self.attack is not None:
            self.attack.load_state_dict(state_dict["attack"])
        else:
            self._pending_state = state_dict["attack"]


def _same_storage(value: Any, batch_input: torch.Tensor) -> bool:
    """Whether the module was called on the batch's input tensor or on a view of it (e.g. its image channels when
    the rest are a mask), so the call's outputs are the training forward's on the adversarial batch."""
    if not isinstance(value, torch.Tensor):
        return False
    return (value._base if value._base is not None else value) is (
        batch_input._base if batch_input._base is not None else batch_input
    )
