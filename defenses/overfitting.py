"""`OverfittingGuard`: stops fast adversarial training at catastrophic overfitting and rolls back to the best epoch.

FGSM-RS training ("fast" adversarial training: Wong, Rice & Kolter, 2020, "Fast is better than free: revisiting
adversarial training", ICLR) can overfit catastrophically: within an epoch or two the model learns to defeat the
single-step attack while its accuracy under PGD falls to about 0. Their reference guards against it by measuring
PGD accuracy on a fixed batch after every epoch and stopping when it drops by more than 0.2; this guard does that
against the best epoch so far, stops the trainer and restores that epoch's weights.

The fixed batch is the first training batch the guard sees (clean: `AdversarialTraining` hands it over before
crafting), kept for the whole run and in checkpoints. Every rank measures its own batch and the counts are summed
over ranks, so all ranks decide alike; weights (identical across DDP ranks) are kept on the CPU.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from typing_extensions import Unpack, override

from trainguard.defenses.attacks import PGD
from trainguard.defenses.attacks.options import AttackOptionKeywords, AttackOptions, AttackSettings
from trainguard.defenses.errors import AttackConfigError
from trainguard.defenses.forward import BatchForward, batch_rows


class OverfittingGuard(AttackSettings, pl.Callback):
    """Stops training at catastrophic overfitting and restores the best epoch's weights.

    After each training epoch it measures PGD accuracy at `eps` on a fixed batch of up to `max_samples` rows (the
    first training batch it sees, kept for the whole run and in checkpoints) and logs it as `adv/guard_acc`;
    accuracy is the mean of `Task.correct` under attack. A drop of more than `max_drop` below the best epoch's stops
    the trainer and loads the best epoch's weights. `rolled_back_from` is then the epoch whose end triggered the
    rollback (else None), `best_epoch` the epoch whose weights the module holds. Used alone, put it before any
    callback that changes batches in place (or it holds an attacked batch); `AdversarialTraining` drives one itself
    (`overfitting_guard=`).

    Args:
        eps: The PGD budget the held batch is attacked at.
        max_drop: The accuracy drop below the best epoch's, in (0, 1], that counts as catastrophic overfitting.
        max_samples: At most this many rows of the first batch are held (None: the whole batch).
        options: The attack settings as one `AttackOptions`, as `AdversarialTraining` hands them over (the held
            rows keep their extra inputs for `forward`); or pass them as keywords instead.
        **settings: The attack settings as keywords (`AttackOptionKeywords`; here `steps` defaults to 5 and `seed`
            to 0, so every epoch attacks from the same random starts).

    Raises:
        AttackConfigError: `max_drop` outside (0, 1], `max_samples` < 1, an attack setting out of range, both
            `options` and attack keywords, or (at the first epoch's end) a guard that was not set up by a Trainer.
        TaskMismatchError: An unknown task name.
        TypeError: A keyword that is no argument and no attack setting.

    Example::

        from pytorch_lightning import Trainer
        from trainguard.defenses import OverfittingGuard

        guard = OverfittingGuard(eps=8 / 255, steps=10, max_drop=0.2)
        Trainer(callbacks=[guard, *other_callbacks]).fit(model, datamodule)
        if guard.rolled_back_from is not None:
            print(f"stopped at epoch {guard.rolled_back_from}, kept epoch {guard.best_epoch}")
    """

    def __init__(
        self,
        *,
        eps: float,
        max_drop: float = 0.2,
        max_samples: int | None = 512,
        options: AttackOptions | None = None,
        **settings: Unpack[AttackOptionKeywords],
    ) -> None:
        if not 0.0 < max_drop <= 1.0:
            raise AttackConfigError(f"max_drop must be within (0, 1], got {max_drop!r}")
        if max_samples is not None and max_samples < 1:
            raise AttackConfigError(f"max_samples must be >= 1 or None, got {max_samples!r}")
        self.options = AttackOptions.given(options, settings, steps=5, seed=0)
        self.eps = eps
        self.max_drop = float(max_drop)
        self.max_samples = max_samples
        self.attack: PGD | None = None
        self._forward: BatchForward | None = None
        self.best_acc: float | None = None
        self.best_epoch: int | None = None
        self.rolled_back_from: int | None = None
        self._held: Any = None
        self._best_weights: dict[str, torch.Tensor] | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._forward = BatchForward(pl_module, self.forward)
        self.attack = PGD(
            pl_module,
            eps=self.eps,
            steps=self.steps,
            step_size=self.step_size,
            loss=self.loss,
            seed=(self.seed or 0) + trainer.global_rank,
            **self.options.attack_arguments(self._forward, trainer),
        )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._held is None:
            x, _ = self.keys.get(batch)
            self._held = batch_rows(batch, slice(self.max_samples), len(x), copy=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        acc = self.held_accuracy(trainer, pl_module)
        if acc is None:
            return
        pl_module.log("adv/guard_acc", acc, on_step=False, on_epoch=True)
        epoch = trainer.current_epoch
        if self.best_acc is None or acc >= self.best_acc:
            self.best_acc, self.best_epoch = acc, epoch
            self._best_weights = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        elif self.best_acc - acc > self.max_drop and self._best_weights is not None:
            pl_module.load_state_dict(self._best_weights)
            trainer.should_stop = True
            self.rolled_back_from = epoch
            rank_zero_warn(
                f"OverfittingGuard: PGD accuracy on the held batch fell from {self.best_acc:.3f} (epoch "
                f"{self.best_epoch}) to {acc:.3f} at epoch {epoch}: catastrophic overfitting; training stopped "
                f"and the weights of epoch {self.best_epoch} restored"
            )

    def held_accuracy(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        """PGD accuracy on the held batch, counts summed over ranks (same random starts every epoch); None before
        any rank held a batch."""
        if self.attack is None or self._forward is None:
            raise AttackConfigError("OverfittingGuard was not set up: attach it to the Trainer's callbacks")
        counts = torch.zeros(2, device=pl_module.device)
        if self._held is not None:
            held = pl_module.transfer_batch_to_device(self._held, pl_module.device, 0)
            x, y = self.keys.get(held)
            self.attack.reset_generator()
            with torch.inference_mode(False), torch.enable_grad(), self._forward.on(held):
                correct = self.task.correct(self.attack.predict(self.attack(x, y)), y)
            counts = torch.stack([correct.sum().float(), counts.new_tensor(float(len(y)))])
        counts = trainer.strategy.reduce(counts, reduce_op="sum")  # every rank joins, even one without batches
        return float(counts[0] / counts[1]) if counts[1] > 0 else None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "held": self._held,
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "best_weights": self._best_weights,
            "rolled_back_from": self.rolled_back_from,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._held = state_dict["held"]
        self.best_acc = state_dict["best_acc"]
        self.best_epoch = state_dict["best_epoch"]
        self._best_weights = state_dict["best_weights"]
        self.rolled_back_from = state_dict["rolled_back_from"]
