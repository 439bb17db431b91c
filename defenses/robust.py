"""`RobustAccuracy`: accuracy under PGD-k at one or more eps, measured during each validation epoch.

The callback attacks the validation batches Lightning already loads (up to `max_samples` of them, the first ones of
the epoch) and logs `val/robust_acc@<eps>` at the end of the epoch through the module, hence through the trainer's
logger. Lightning's MLFlowLogger strips characters MLflow refuses, so there the name reads `val/robust_acc0.1`;
pass `name=` to choose another template. Counts are summed over DDP ranks before logging.

Per eps and batch it costs the attack's `steps` forward-backward passes plus the one forward at the final point
that PGD itself never evaluates (its last logits are those of the point before its last step); no clean forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from trainguard.defenses.attacks import PGD, crafting_autocast, parse_crafting
from trainguard.defenses.attacks.base import Bound, LossFn
from trainguard.defenses.attacks.batches import BatchKeys, Key
from trainguard.defenses.attacks.bounds import check_bounds
from trainguard.defenses.errors import AttackConfigError
from trainguard.defenses.forward import BatchForward, ModuleForward, batch_rows
from trainguard.defenses.task import Task, as_task


class RobustAccuracy(pl.Callback):
    """Logs the accuracy of the model under `steps`-step PGD at each of `eps` on the validation set.

    `max_samples` bounds the cost (None: the whole validation set of `dataloader_idx`); the random starts are drawn
    from `seed` anew each epoch, so epochs are comparable. `name` is a format string with an `{eps}` field.
    `crafting="trainer"` attacks and predicts under the autocast of the trainer's precision, `"fp32"` in float32.
    `task` gives the loss PGD maximises and what a correct prediction is (argmax for classification, all labels
    right for multilabel, every output within tolerance for regression): the logged value is the mean of
    `Task.correct` under attack. `forward(module, batch, x)` reads extra model inputs from the batch; only `x` is
    attacked. `bounds` is the data's value range (required).
    """

    def __init__(
        self,
        eps: float | Sequence[float] = (8 / 255,),
        *,
        steps: int = 10,
        step_size: float | None = None,
        norm: str | float = "inf",
        bounds: tuple[Bound, Bound] | None = (0.0, 1.0),
        loss: LossFn | None = None,
        task: Task | str | None = None,
        max_samples: int | None = 512,
        input_key: Key | None = None,
        target_key: Key | None = None,
        forward: ModuleForward | None = None,
        dataloader_idx: int = 0,
        seed: int = 0,
        name: str = "val/robust_acc@{eps:g}",
        crafting: str = "trainer",
    ) -> None:
        self.eps = tuple(float(e) for e in (eps if isinstance(eps, Sequence) else (eps,)))
        if not self.eps or any(e < 0 for e in self.eps):
            raise AttackConfigError(f"eps must be one or more numbers >= 0, got {eps!r}")
        if max_samples is not None and max_samples < 1:
            raise AttackConfigError(f"max_samples must be >= 1 or None, got {max_samples!r}")
        if step_size is not None and len(self.eps) > 1:
            raise AttackConfigError("step_size applies to one eps; leave it None (2.5 eps / steps) for several eps")
        self.steps = steps
        self.step_size = step_size
        self.norm = norm
        self.bounds = check_bounds(bounds)
        self.loss = loss
        self.task = as_task(task)
        self.max_samples = max_samples
        self.keys = BatchKeys(input_key, target_key)
        self.forward = forward
        self.dataloader_idx = dataloader_idx
        self.seed = seed
        self.name = name
        self.crafting = parse_crafting(crafting)
        self.attack: PGD | None = None
        self._forward: BatchForward | None = None
        self._correct: torch.Tensor | None = None
        self._seen = 0

    def metric_names(self) -> list[str]:
        """The logged metric names, one per eps."""
        return [self.name.format(eps=e) for e in self.eps]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._forward = BatchForward(pl_module, self.forward)
        self.attack = PGD(
            pl_module,
            eps=max(self.eps),
            steps=self.steps,
            step_size=self.step_size,
            norm=self.norm,
            bounds=self.bounds,
            loss=self.loss,
            task=self.task,
            forward=self._forward,
            seed=self.seed + trainer.global_rank,
            autocast=crafting_autocast(self.crafting, trainer),
        )

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._correct = None
        self._seen = 0
        if self.attack is not None:
            self.attack.reset_generator()

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or dataloader_idx != self.dataloader_idx or self.attack is None:
            return
        assert self._forward is not None
        room = None if self.max_samples is None else self.max_samples - self._seen
        if room is not None and room <= 0:
            return
        x, y = self.keys.get(batch)
        self.task.check_targets(y)
        # `Trainer.validate` runs under inference mode; attacks need autograd on ordinary (cloned) tensors.
        with torch.inference_mode(False), torch.enable_grad():
            subset = batch_rows(batch, slice(room), len(x), copy=True)
            x, y = x[:room].clone(), y[:room].clone()
            if self._correct is None:
                self._correct = torch.zeros(len(self.eps), device=x.device)
            with self._forward.on(subset):
                for i, eps in enumerate(self.eps):
                    outputs = self.attack.predict(self.attack(x, y, eps=eps))
                    self._correct[i] += self.task.correct(outputs, y).sum()
        self._seen += len(y)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        correct = self._correct if self._correct is not None else torch.zeros(len(self.eps), device=pl_module.device)
        counts = torch.cat([correct.float(), correct.new_tensor([self._seen]).float()])
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        seen = counts[-1]
        if seen == 0:
            return
        for name, correct in zip(self.metric_names(), counts[:-1], strict=True):
            pl_module.log(name, correct / seen, on_step=False, on_epoch=True, sync_dist=False)
