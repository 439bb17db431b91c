"""`RobustAccuracy`: accuracy under one or more attacks at one or more eps, measured during each validation epoch.

The callback attacks the validation batches Lightning already loads (up to `max_samples` of them, the first ones of
the epoch) and logs `val/robust_acc_eps<eps>` at the end of the epoch through the module, hence through the trainer's
logger. The name uses only characters MLflow keeps (Lightning's MLFlowLogger would rewrite `@`), so it reads the same
in MLflow, in DVC and in the cycle's report; pass `name=` to choose another template. Counts are summed over DDP
ranks before logging.

With several attacks (e.g. PGD, APGD-CE and APGD-DLR, the core of AutoAttack: Croce & Hein, 2020) a sample counts
as robust only if every attack leaves it correctly classified, as in AutoAttack's ensemble: `val/robust_acc_eps<eps>`
is that worst case, and `val/robust_acc_eps<eps>/<attack>` each attack's own accuracy.

With a preset (`attacks="autoattack"`: APGD-CE, APGD-T, FAB-T, Square; `"autoattack-fast"`: APGD-CE, APGD-T) the
attacks run as AutoAttack's cascade (`trainguard.defenses.attacks.cascade`): each attack only on the rows still
robust, so the worst case costs what the rows still standing cost. Its own accuracy is then not measured for the
later attacks; `val/robust_acc_eps<eps>/broken_by/<attack>` is the share of rows each attack broke first (clean
errors + these shares + the worst case = 1), `val/robust_cost/<attack>/seconds` and `.../gradients` what each
attack cost in the epoch on this rank (wall seconds, rows through the model with an input gradient; `costs`
keeps the full count, the masking check's run included). A preset also checks for gradient masking
(`trainguard.defenses.masking`): `val/gradient_masking` is 1 when Square breaks more than a few rows the white-box
attacks left robust, or when more than a few rows resist the white-box attacks at half the bounds' range
(`val/robust_acc_large_eps`); `masking` keeps the last epoch's check.

Per eps, attack and batch it costs the attack's forward-backward passes (PGD: `steps`; APGD: `steps + 1` per
restart) plus the one forward at the final point that the attack itself never evaluates; no clean forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from typing_extensions import Unpack, override

from trainguard.defenses.attacks import ATTACKS, make_attack
from trainguard.defenses.attacks.base import Attack
from trainguard.defenses.attacks.bounds import Bounds
from trainguard.defenses.attacks.cascade import BLACK_BOX, PRESETS, AttackCost, Cascade
from trainguard.defenses.attacks.options import AttackOptionKeywords, AttackOptions, AttackSettings
from trainguard.defenses.errors import AttackConfigError
from trainguard.defenses.forward import BatchForward, batch_rows
from trainguard.defenses.masking import MaskingCheck, large_eps

LARGE_EPS_CHECK = "large-eps check"  # the masking check's run, in `RobustAccuracy.costs`


def correct_under_attacks(
    attacks: Mapping[str, Attack], x: torch.Tensor, y: torch.Tensor, eps: float
) -> dict[str, torch.Tensor]:
    """Per attack, which rows of `x` the model still gets right (its task's `correct`) at the attack's final point.

    A row's score against the ensemble is its worst over the attacks: `torch.stack([...]).amin(0)`.

    Args:
        attacks: Attacks by name, each bound to the model (`make_attack`).
        x: The clean inputs.
        y: Their targets.
        eps: The budget every attack runs at (>= 0).

    Returns:
        Per attack name, the per-row correctness (N,) as floats in [0, 1].

    Raises:
        AttackConfigError: `eps` negative or not finite.
        AttackInputError: Inputs outside an attack's bounds, or not floating point.
        TaskMismatchError: Outputs or targets that do not fit an attack's task.
    """
    return {
        name: attack.task.correct(attack.predict(attack(x, y, eps=eps)), y).float() for name, attack in attacks.items()
    }


class RobustAccuracy(AttackSettings, pl.Callback):
    """Logs the accuracy of the model under `attacks` (default PGD alone) at each of `eps` on the validation set.

    The callback attacks the validation batches Lightning already loads (up to `max_samples` rows, the first ones of
    the epoch) and logs `name` per eps at the epoch's end (counts summed over DDP ranks). The logged value is the
    mean of `Task.correct` under attack (argmax for classification, all labels right for multilabel, every output
    within tolerance for regression); with several attacks a row counts as robust only if every attack leaves it
    correct, and each attack's own accuracy is also logged, as `name` + `/<attack>`. A preset runs as AutoAttack's
    cascade, logs what each attack broke first and what it cost, and checks for gradient masking (`masking`).

    Args:
        eps: One budget or several, each >= 0.
        attacks: Attack names, e.g. `"pgd"`, `"apgd-ce"`, `"apgd-dlr"`, or a preset name (`"autoattack"`,
            `"autoattack-fast"`).
        restarts: APGD's (and FAB-T's) random starts, >= 1.
        max_samples: Rows attacked per epoch, which bounds the cost (None: the whole validation set).
        dataloader_idx: The validation dataloader whose batches are attacked.
        name: A format string with an `{eps}` field: the logged metric's name.
        large_eps_check: Presets only: adds the masking check's run of the white-box attacks at half the bounds'
            range (the Square check reads the cascade itself and costs nothing more).
        options: The attack settings as one `AttackOptions` (e.g. shared with `AdversarialTraining`); or pass them
            as keywords instead.
        **settings: The attack settings as keywords (`AttackOptionKeywords`: `steps` (None: 10, or AutoAttack's
            100 for a preset), `step_size` and `loss` (PGD's; APGD has its own), `norm`, `bounds` (the
            data's value range, required), `task`, `input_key`, `target_key`, `forward`, `seed` (0 here:
            the random starts are drawn from it anew each epoch, so epochs are comparable), `crafting_precision`
            (`"trainer"`: attacks and predictions under the autocast of the trainer's precision; `"fp32"`)). Kept
            as `options`.

    Raises:
        AttackConfigError: No eps or a negative one, `max_samples` < 1, `step_size` with several eps, unknown or
            repeated attacks, `restarts` < 1, an attack setting out of range, or both `options` and attack
            keywords.
        TaskMismatchError: An unknown task name, or APGD for a task other than classification.
        TypeError: A keyword that is no argument and no attack setting.

    Example::

        from pytorch_lightning import Trainer
        from trainguard.defenses import RobustAccuracy

        robust = RobustAccuracy(eps=(4 / 255, 8 / 255), attacks="autoattack-fast", max_samples=1000)
        trainer = Trainer(callbacks=[robust])
        trainer.validate(model, datamodule)
        print(robust.metric_names(), trainer.callback_metrics[robust.metric_names()[-1]])
    """

    def __init__(
        self,
        eps: float | Sequence[float] = (8 / 255,),
        *,
        attacks: Sequence[str] | str = ("pgd",),
        restarts: int = 1,
        max_samples: int | None = 512,
        dataloader_idx: int = 0,
        name: str = "val/robust_acc_eps{eps:g}",
        large_eps_check: bool = True,
        options: AttackOptions | None = None,
        **settings: Unpack[AttackOptionKeywords],
    ) -> None:
        self.eps = tuple(float(e) for e in (eps if isinstance(eps, Sequence) else (eps,)))
        if not self.eps or any(e < 0 for e in self.eps):
            raise AttackConfigError(f"eps must be one or more numbers >= 0, got {eps!r}")
        if max_samples is not None and max_samples < 1:
            raise AttackConfigError(f"max_samples must be >= 1 or None, got {max_samples!r}")
        self.preset = attacks.lower() if isinstance(attacks, str) and attacks.lower() in PRESETS else None
        names = PRESETS[self.preset] if self.preset else [attacks] if isinstance(attacks, str) else attacks
        self.attack_names = tuple(a.lower() for a in names)
        unknown = [a for a in self.attack_names if a not in ATTACKS]
        if self.preset and unknown:
            raise AttackConfigError(f"preset {self.preset!r} needs {', '.join(unknown)}, which this install lacks")
        if not self.attack_names or unknown or len(set(self.attack_names)) < len(self.attack_names):
            raise AttackConfigError(
                f"attacks must be distinct names among {', '.join(ATTACKS)} or a preset among {', '.join(PRESETS)}, "
                f"got {attacks!r}"
            )
        if restarts < 1:
            raise AttackConfigError(f"restarts must be >= 1, got {restarts!r}")
        self.options = AttackOptions.given(options, settings, steps=100 if self.preset else 10, seed=0)
        if self.step_size is not None and len(self.eps) > 1:
            raise AttackConfigError("step_size applies to one eps; leave it None (2.5 eps / steps) for several eps")
        if self.task.kind != "classification" and any(a.startswith("apgd") for a in self.attack_names):
            self.task.refuse_unless(("classification",), "APGD")
        self.restarts = restarts
        self.max_samples = max_samples
        self.dataloader_idx = dataloader_idx
        self.name = name
        self.large_eps_check = large_eps_check and self.preset is not None
        self.attacks: dict[str, Attack] = {}
        self.costs: dict[str, AttackCost] = {}
        self.masking: MaskingCheck | None = None
        self._cascade: Cascade | None = None
        self._forward: BatchForward | None = None
        self._correct: torch.Tensor | None = None
        self._large_robust = 0
        self._large_eps: float | None = None
        self._seen = 0

    def metric_names(self) -> list[str]:
        """The logged metric names, one per eps: accuracy under the worst case of the attacks, per sample."""
        return [self.name.format(eps=e) for e in self.eps]

    def attack_metric_names(self) -> dict[str, list[str]]:
        """Per attack, its metric names, one per eps: its own accuracy (logged only when there are several attacks),
        or for a preset's cascade the share of rows it broke first."""
        if self.preset:
            return {a: [f"{n}/broken_by/{a}" for n in self.metric_names()] for a in self.attack_names}
        if len(self.attack_names) == 1:
            return {}
        return {a: [f"{n}/{a}" for n in self.metric_names()] for a in self.attack_names}

    @override
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
                loss=self.loss if name == "pgd" else None,
                seed=(self.seed or 0) + trainer.global_rank,
                **self.options.attack_arguments(self._forward, trainer),
            )
            for name in self.attack_names
        }
        self._cascade = Cascade(self.attacks) if self.preset else None

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._correct = None
        self._seen = 0
        self._large_robust = 0
        self.costs = {}
        for attack in self.attacks.values():
            attack.reset_generator()

    @override
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
                if self._cascade is not None:
                    self._run_cascade(self._cascade, x, y)
                else:
                    for i, eps in enumerate(self.eps):
                        correct = torch.stack(list(correct_under_attacks(self.attacks, x, y, eps).values()))
                        self._correct[i, 0] += correct.amin(dim=0).sum()
                        self._correct[i, 1:] += correct.sum(dim=1)
        self._seen += len(y)

    def _run_cascade(self, cascade: Cascade, x: torch.Tensor, y: torch.Tensor) -> None:
        """The preset's cascade at each eps (counts: robust rows, rows each attack broke, costs), then the white-box
        attacks at the large eps of the masking check."""
        assert self._correct is not None
        for i, eps in enumerate(self.eps):
            result = cascade(x, y, eps)
            self._correct[i, 0] += result.robust.sum()
            self._correct[i, 1:] += torch.stack(list(result.broken_by.values())).sum(dim=1)
            for name, cost in result.costs.items():
                self.costs[name] = self.costs.get(name, AttackCost()) + cost
        if self.large_eps_check:
            lower, upper = Bounds(self.bounds).like(x)
            self._large_eps = large_eps(lower, upper, x, self.norm)
            check = cascade(x, y, self._large_eps, skip=BLACK_BOX)
            self._large_robust += int(check.robust.sum())
            self.costs[LARGE_EPS_CHECK] = sum(check.costs.values(), self.costs.get(LARGE_EPS_CHECK, AttackCost()))

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        correct = self._correct
        if correct is None:
            correct = torch.zeros(len(self.eps), 1 + len(self.attack_names), device=pl_module.device)
        extra = [self._large_robust, self._seen]
        counts = torch.cat([correct.flatten().float(), correct.new_tensor(extra).float()])
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        seen = counts[-1]
        if seen == 0:
            return
        rates = (counts[:-2] / seen).view(len(self.eps), -1)
        for name, rate in zip(self.metric_names(), rates[:, 0], strict=True):
            pl_module.log(name, rate, on_step=False, on_epoch=True, sync_dist=False)
        for j, names in enumerate(self.attack_metric_names().values(), start=1):
            for name, rate in zip(names, rates[:, j], strict=True):
                pl_module.log(name, rate, on_step=False, on_epoch=True, sync_dist=False)
        if self.preset:
            self._log_preset(pl_module, counts[:-2].view(len(self.eps), -1), int(counts[-2]), int(seen))

    def _log_preset(self, pl_module: pl.LightningModule, counts: torch.Tensor, large_robust: int, seen: int) -> None:
        """The cascade's cost per attack and the gradient-masking flags, from the epoch's counts over all ranks."""
        for name, cost in self.costs.items():
            name = name.replace(" ", "_")
            pl_module.log(f"val/robust_cost/{name}/seconds", cost.seconds, on_step=False, on_epoch=True)
            pl_module.log(f"val/robust_cost/{name}/gradients", float(cost.gradients), on_step=False, on_epoch=True)
        black_box = [j for j, a in enumerate(self.attack_names, start=1) if a in BLACK_BOX]
        self.masking = MaskingCheck(
            rows=seen,
            black_box_rows=int(counts[:, black_box].sum(dim=1).max()) if black_box else None,
            large_eps=self._large_eps if self.large_eps_check else None,
            large_eps_robust_rows=large_robust if self.large_eps_check else None,
        )
        values = {
            "val/gradient_masking": float(self.masking.flagged),
            "val/gradient_masking/black_box": float(self.masking.black_box),
            "val/gradient_masking/large_eps": float(self.masking.large_eps_robust),
        }
        if self.large_eps_check:
            values["val/robust_acc_large_eps"] = large_robust / seen
        for name, value in values.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False)
