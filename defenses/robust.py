"""`RobustAccuracy`: accuracy under one or more attacks at one or more eps, measured during each validation epoch.

The callback attacks the validation batches Lightning already loads (up to `max_samples` of them, the first ones of
the epoch) and logs `val/robust_acc@<eps>` at the end of the epoch through the module, hence through the trainer's
logger. Lightning's MLFlowLogger strips characters MLflow refuses, so there the name reads `val/robust_acc0.1`;
pass `name=` to choose another template. Counts are summed over DDP ranks before logging.

With several attacks (e.g. PGD, APGD-CE and APGD-DLR, the core of AutoAttack: Croce & Hein, 2020) a sample counts
as robust only if every attack leaves it correctly classified, as in AutoAttack's ensemble: `val/robust_acc@<eps>`
is that worst case, and `val/robust_acc@<eps>/<attack>` each attack's own accuracy.

Per eps, attack and batch it costs the attack's forward-backward passes (PGD: `steps`; APGD: `steps + 1` per
restart) plus the one forward at the final point that the attack itself never evaluates; no clean forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from trainguard.defenses.attacks import ATTACKS, crafting_autocast, make_attack, parse_crafting
from trainguard.defenses.attacks.base import Attack, Bound, LossFn
from trainguard.defenses.attacks.batches import BatchKeys, Key
from trainguard.defenses.attacks.bounds import check_bounds
from trainguard.defenses.errors import AttackConfigError
from trainguard.defenses.forward import BatchForward, ModuleForward, batch_rows
from trainguard.defenses.task import Task, as_task


def correct_under_attacks(
    attacks: Mapping[str, Attack], x: torch.Tensor, y: torch.Tensor, eps: float
) -> dict[str, torch.Tensor]:
    """Per attack, which rows of `x` the model still gets right (its task's `correct`) at the attack's final point.

    A row's score against the ensemble is its worst over the attacks: `torch.stack([...]).amin(0)`.
    """
    return {
        name: attack.task.correct(attack.predict(attack(x, y, eps=eps)), y).float() for name, attack in attacks.items()
    }


class RobustAccuracy(pl.Callback):
    """Logs the accuracy of the model under `attacks` (default PGD alone) at each of `eps` on the validation set.

    `attacks` are attack names, e.g. `"pgd"`, `"apgd-ce"`, `"apgd-dlr"`; each runs `steps` iterations (APGD from each
    of `restarts` random starts; `step_size` and `loss` are PGD's, APGD has its own). `max_samples` bounds the cost
    (None: the whole validation set of `dataloader_idx`); the random starts are drawn from `seed` anew each epoch, so
    epochs are comparable. `name` is a format string with an `{eps}` field; with several attacks each one's accuracy
    is also logged, as `name` + `/<attack>`.
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
        attacks: Sequence[str] = ("pgd",),
        steps: int = 10,
        restarts: int = 1,
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
        self.attack_names = tuple(a.lower() for a in ([attacks] if isinstance(attacks, str) else attacks))
        unknown = [a for a in self.attack_names if a not in ATTACKS]
        if not self.attack_names or unknown or len(set(self.attack_names)) < len(self.attack_names):
            raise AttackConfigError(f"attacks must be distinct names among {', '.join(ATTACKS)}, got {attacks!r}")
        if restarts < 1:
            raise AttackConfigError(f"restarts must be >= 1, got {restarts!r}")
        self.task = as_task(task)
        if self.task.kind != "classification" and any(a.startswith("apgd") for a in self.attack_names):
            self.task.refuse_unless(("classification",), "APGD")
        self.steps = steps
        self.restarts = restarts
        self.step_size = step_size
        self.norm = norm
        self.bounds = check_bounds(bounds)
        self.loss = loss
        self.max_samples = max_samples
        self.keys = BatchKeys(input_key, target_key)
        self.forward = forward
        self.dataloader_idx = dataloader_idx
        self.seed = seed
        self.name = name
        self.crafting = parse_crafting(crafting)
        self.attacks: dict[str, Attack] = {}
        self._forward: BatchForward | None = None
        self._correct: torch.Tensor | None = None
        self._seen = 0

    def metric_names(self) -> list[str]:
        """The logged metric names, one per eps: accuracy under the worst case of the attacks, per sample."""
        return [self.name.format(eps=e) for e in self.eps]

    def attack_metric_names(self) -> dict[str, list[str]]:
        """Per attack, its own metric names, one per eps (logged only when there are several attacks)."""
        if len(self.attack_names) == 1:
            return {}
        return {a: [f"{n}/{a}" for n in self.metric_names()] for a in self.attack_names}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._forward = BatchForward(pl_module, self.forward)
        self.attacks = {
            name: make_attack(
                name,
                pl_module,
                eps=max(self.eps),
                steps=self.steps,
                step_size=self.step_size if name == "pgd" else None,
                restarts=self.restarts,
                norm=self.norm,
                bounds=self.bounds,
                loss=self.loss if name == "pgd" else None,
                task=self.task,
                forward=self._forward,
                seed=self.seed + trainer.global_rank,
                autocast=crafting_autocast(self.crafting, trainer),
            )
            for name in self.attack_names
        }

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._correct = None
        self._seen = 0
        for attack in self.attacks.values():
            attack.reset_generator()

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or dataloader_idx != self.dataloader_idx or not self.attacks:
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
                # Per eps: the worst case over the attacks, then each attack's own count.
                self._correct = torch.zeros(len(self.eps), 1 + len(self.attacks), device=x.device)
            with self._forward.on(subset):
                for i, eps in enumerate(self.eps):
                    correct = torch.stack(list(correct_under_attacks(self.attacks, x, y, eps).values()))
                    self._correct[i, 0] += correct.amin(dim=0).sum()
                    self._correct[i, 1:] += correct.sum(dim=1)
        self._seen += len(y)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        correct = self._correct
        if correct is None:
            correct = torch.zeros(len(self.eps), 1 + len(self.attack_names), device=pl_module.device)
        counts = torch.cat([correct.flatten().float(), correct.new_tensor([self._seen]).float()])
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        seen = counts[-1]
        if seen == 0:
            return
        rates = (counts[:-1] / seen).view(len(self.eps), -1)
        for name, rate in zip(self.metric_names(), rates[:, 0], strict=True):
            pl_module.log(name, rate, on_step=False, on_epoch=True, sync_dist=False)
        for j, names in enumerate(self.attack_metric_names().values(), start=1):
            for name, rate in zip(names, rates[:, j], strict=True):
                pl_module.log(name, rate, on_step=False, on_epoch=True, sync_dist=False)
