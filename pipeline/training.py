"""The cycle's training step: the user's LightningModule, trained on verified shards with trainguard's callbacks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from trainguard.defenses import TRADES, AdversarialTraining, RobustAccuracy
from trainguard.defenses.attacks.options import AttackOptionKeywords, AttackOptions
from trainguard.defenses.gate import GateVerdict, ModelGate
from trainguard.defenses.heldout import HeldoutMetrics, LabeledData
from trainguard.pipeline.config import CycleConfig
from trainguard.pipeline.distributed import Launch, arrive_at, launch_from_env
from trainguard.provenance.allowlist import RefusedRead
from trainguard.provenance.dataset import VerifiedDataModule
from trainguard.provenance.reader import ReadLog


@dataclass(frozen=True)
class TrainingResult:
    """What the fit produced: the gate's verdict, the logged metrics, the shards it read, the allowed shards it
    refused at read (changed after intake: not trained on) and the adversarial training it ran (`adversarial`)."""

    verdict: GateVerdict
    metrics: dict[str, float]
    read_log: ReadLog
    robust_accuracy: dict[str, float]
    refused: tuple[RefusedRead, ...] = ()
    gradient_masking: dict[str, object] | None = None
    robust_cost: dict[str, dict[str, float]] | None = None
    adversarial: str = "off"


def trainer(
    config: CycleConfig, callbacks: Sequence[pl.Callback], logger: Any, max_epochs: int, *, alone: bool = False
) -> pl.Trainer:
    """The config's `trainer:` block with what the cycle supplies (its callbacks and logger, no checkpoints: the
    cycle saves signed models; a progress bar only on a terminal); under a launcher, the launch's size and its
    Lightning cluster environment (`launch_from_env`). `alone` runs it in this process only, whatever the config's
    devices and strategy and whether other ranks wait elsewhere (rank 0's bootstrap)."""
    from trainguard.pipeline.console import epoch_progress

    overrides: dict[str, Any] = {"max_epochs": max_epochs}
    injected: dict[str, Any] = {}
    if alone:
        overrides.update(devices=1, strategy="auto", num_nodes=1)
        callbacks = [*callbacks, MetricsAlone()]
    elif (launch := launch_from_env()) is not None:
        overrides.update(_launched_world(launch, config.trainer.init_args.get("strategy", "auto")))
        if "plugins" not in config.trainer.init_args:  # else Lightning detects the same environment itself
            injected["plugins"] = [launch.environment]
    progress = epoch_progress()
    settings = config.trainer.model_copy(
        update={"init_args": {"log_every_n_steps": 1, **config.trainer.init_args, **overrides}}
    )
    trainer: pl.Trainer = settings.instantiate(
        callbacks=[*callbacks, *([progress] if progress is not None else [])],
        logger=logger if logger is not None else False,
        enable_checkpointing=False,
        enable_progress_bar=progress is not None,
        enable_model_summary=False,
        **injected,
    )
    return trainer


def _launched_world(launch: Launch, strategy: Any) -> dict[str, Any]:
    """Under an external launcher the job's size decides the Trainer's: its processes per node as `devices`, its
    nodes as `num_nodes` (Lightning refuses any other product), and DDP where the config leaves the strategy to
    Lightning, so the README's `torchrun` line runs a config written for one device."""
    world: dict[str, Any] = {"devices": launch.devices, "num_nodes": launch.num_nodes}
    if strategy in (None, "auto"):
        world["strategy"] = "ddp"
    return world


def _not_distributed() -> bool:
    return False


class MetricsAlone(pl.Callback):
    """For a fit in this process alone while the job's process group is up: the module's torchmetrics metrics
    compute on this process's data without syncing, as they would otherwise wait in a collective for ranks that
    are not fitting; each gets its own setting back when the fit ends or fails (a DDP fit later syncs them)."""

    def __init__(self) -> None:
        self.saved: list[tuple[Any, Callable[[], bool] | None]] = []

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torchmetrics import Metric

        for metric in pl_module.modules():
            if isinstance(metric, Metric):
                self.saved.append((metric, metric.distributed_available_fn))
                metric.distributed_available_fn = _not_distributed

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for metric, available in self.saved:
            metric.distributed_available_fn = available
        self.saved.clear()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")


def bootstrap(model: pl.LightningModule, config: CycleConfig, trusted: LabeledData) -> pl.Trainer:
    """First cycle only: fits `model` on the curator's trusted training data, so RONI has a model to measure
    candidates against and the gate has a baseline; returns the Trainer that fitted it."""
    loader = DataLoader(
        TensorDataset(trusted.x, trusted.y),
        batch_size=config.training.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(config.training.seed),
    )
    fit = trainer(config, [], None, config.training.bootstrap_epochs, alone=True)
    fit.fit(model, loader)
    return fit


def adversarial_method(config: CycleConfig) -> str:
    """What adversarial training the cycle runs: the config's attack (`trades`: the TRADES objective), or `off`."""
    return config.adversarial.attack if config.adversarial.enabled else "off"


def model_attack_keywords(config: CycleConfig) -> AttackOptionKeywords:
    """What every attack of the cycle takes from the config, whatever it is for: the data's value range (the
    adversarial section's `bounds`), the task and the `model_forward` hook."""
    return {"bounds": config.adversarial.bounds, "task": config.task.build(), "forward": config.forward_hook()}


def adversarial_options(config: CycleConfig) -> AttackOptions:
    """The attack settings of adversarial training, TRADES or not: the adversarial section's steps, step size and
    norm, the training seed and `model_attack_keywords`."""
    adversarial = config.adversarial
    settings: AttackOptionKeywords = {
        "steps": adversarial.steps,
        "step_size": adversarial.step_size,
        "norm": adversarial.norm,
        "seed": config.training.seed,
        **model_attack_keywords(config),
    }
    return AttackOptions.of(**settings)


def fitted_module(config: CycleConfig, model: pl.LightningModule) -> pl.LightningModule:
    """The module the Trainer fits: `model` itself, or with `adversarial.attack: trades` the TRADES wrapper that
    trains `model` (in place) on TRADES' objective with the adversarial section's eps, `trades_beta` and
    `adversarial_options`."""
    if adversarial_method(config) != "trades":
        return model
    adversarial = config.adversarial
    return TRADES(model, eps=adversarial.eps, beta=adversarial.trades_beta, options=adversarial_options(config))


def defense_callbacks(config: CycleConfig, holdout: LabeledData, previous: HeldoutMetrics | None) -> list[pl.Callback]:
    """Adversarial training (unless TRADES trains through `fitted_module`), robust accuracy and the model gate, as
    the config sets them, for the config's task and with its `model_forward` hook.

    The gate's baseline without a comparable record is the incoming model: the cycle's incoming model is the
    champion or, on the first cycle, the model bootstrapped on the trusted data, never a random initialisation."""
    adversarial, robust, gate = config.adversarial, config.robust_eval, config.gate
    task, forward = config.task.build(), config.forward_hook()
    callbacks: list[pl.Callback] = []
    if adversarial_method(config) in ("fgsm", "pgd", "fgsm-rs"):
        callbacks.append(
            AdversarialTraining(
                adversarial.attack,
                eps=adversarial.eps,
                ratio=adversarial.ratio,
                warmup_epochs=adversarial.warmup_epochs,
                options=adversarial_options(config),
            )
        )
    settings: AttackOptionKeywords = {"steps": robust.steps, "seed": 0, **model_attack_keywords(config)}
    callbacks.append(
        RobustAccuracy(
            robust.eps, attacks=robust.attacks, restarts=robust.restarts, max_samples=robust.subset_size, **settings
        )
    )
    callbacks.append(
        ModelGate(
            holdout,
            num_classes=len(config.validation.labels) if task.kind == "classification" else None,
            max_drop=gate.max_accuracy_drop,
            max_class_drop=gate.max_class_drop,
            previous=previous,
            raise_on_reject=False,
            baseline="incoming",
            task=task,
            forward=forward,
        )
    )
    return callbacks


def user_callbacks(config: CycleConfig) -> list[pl.Callback]:
    """The config's own `callbacks`, new instances, run after the defenses."""
    return [component.instantiate() for component in config.callbacks]


def train(
    model: pl.LightningModule,
    config: CycleConfig,
    data: VerifiedDataModule,
    holdout: LabeledData,
    previous: HeldoutMetrics | None,
    logger: Any,
) -> TrainingResult:
    """Fits `model` on the shards `data` reads (the cycle's allow-list, each verified on read) with the defenses."""
    defenses = defense_callbacks(config, holdout, previous)
    fit = trainer(config, [*defenses, *user_callbacks(config)], logger, config.trainer.arg("max_epochs"))
    arrive_at("the start of training")
    fit.fit(fitted_module(config, model), datamodule=data)
    gate = next(c for c in defenses if isinstance(c, ModelGate))
    robust = next(c for c in defenses if isinstance(c, RobustAccuracy))
    metrics = {k: float(v) for k, v in fit.callback_metrics.items() if v.numel() == 1}
    assert gate.verdict is not None, "the gate decides at fit end"
    return TrainingResult(
        verdict=gate.verdict,
        metrics=metrics,
        read_log=data.read_log,
        refused=data.refused,
        robust_accuracy={
            f"{e:g}": metrics.get(n, float("nan")) for e, n in zip(robust.eps, robust.metric_names(), strict=True)
        },
        gradient_masking=robust.masking.to_dict() if robust.masking is not None else None,
        robust_cost={name: cost.to_dict() for name, cost in robust.costs.items()} if robust.preset else None,
        adversarial=adversarial_method(config),
    )
