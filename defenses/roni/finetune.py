"""The fine-tuned copies: the network and data they fine-tune (the whole model, or its head on frozen features),
the held-out readout they are measured by, what their fine-tuning did to the held-out margin (`_Impacts`) and the
tally of copies trained (`ScreeningProgress`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from typing_extensions import override

from trainguard.defenses.copies import Finetuned, finetune_heldout_scores
from trainguard.defenses.errors import ScreeningInputError
from trainguard.defenses.features import HeadSplit, has_head, head_features, split_head
from trainguard.defenses.forward import ModuleForward, plain_forward
from trainguard.defenses.heldout import LabeledData, per_class_mean
from trainguard.defenses.roni.candidates import Candidate
from trainguard.defenses.roni.config import ScreeningConfig
from trainguard.defenses.roni.draws import _LazyShards
from trainguard.defenses.task import Task

ScreeningProgress = Callable[[int, int], None]
"""Told (copies fine-tuned, copies planned) as a screening goes; the plan grows when the rate search tries another
rate."""


class _Count:
    """The copies a screening has planned and trained, told to its progress callback at each change (mutable: the
    one running tally of a screening)."""

    def __init__(self, progress: ScreeningProgress | None) -> None:
        self.progress = progress
        self.done = 0
        self.total = 0

    def plan(self, copies: int) -> None:
        self.total += copies
        self._tell()

    def trained(self, copies: int) -> None:
        self.done += copies
        self._tell()

    def _tell(self) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total)


def _readout(task: Task) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per held-out row: the soft accuracy (the learning-rate probe's) and the margin (the impacts')."""

    def read(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([task.soft_correct(outputs, y), task.margin(outputs, y)], -1)

    return read


@torch.no_grad()
def _heldout_scores(model: nn.Module, holdout: LabeledData, task: Task, forward: ModuleForward | None) -> torch.Tensor:
    """The deployed model's readout of every held-out row (rows x 2)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        batch = {name: value.to(device) for name, value in holdout.batch(slice(None)).items()}
        return _readout(task)((forward or plain_forward)(model, batch, batch["x"]), batch["y"]).cpu()
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class _Scoped:
    """The network each copy fine-tunes and the data in its input space (the frozen features for a head), with the
    task it trains on and the forward hook (full scope only) that feeds it extra inputs."""

    net: nn.Module
    head: str | None
    trusted: LabeledData
    holdout: LabeledData
    candidates: tuple[LabeledData, ...]
    task: Task
    forward: ModuleForward | None
    count: _Count

    def finetuned(
        self, shards: Sequence[LabeledData], lr: float, config: ScreeningConfig, chunk_size: int | None
    ) -> Finetuned:
        """Held-out soft accuracy and margin of one copy per shard at each checkpoint (`defenses.copies`), each shard
        trimmed as `config.trim` asks."""
        return finetune_heldout_scores(
            self.net,
            _Trimmed(shards, self, config) if config.trim else shards,
            self.holdout,
            lr=lr,
            steps=config.steps,
            checkpoints=config.marks,
            readout=_readout(self.task),
            chunk_size=chunk_size,
            batched=config.batched,
            task=self.task,
            forward=self.forward,
            progress=self.count.trained,
        )


class _Trimmed(_LazyShards):
    """Shards less their rows the deployed network contradicts most (`ScreeningConfig.trim`), trimmed as they are
    read: candidates and calibration draws go through the same rule."""

    def __init__(self, shards: Sequence[LabeledData], scoped: _Scoped, config: ScreeningConfig) -> None:
        super().__init__(len(shards))
        self.shards = shards
        self.scoped = scoped
        self.config = config

    @override
    def _shard(self, index: int) -> LabeledData:
        shard = self.shards[index]
        drop = self.config.trimmed(len(shard))
        if not drop:
            return shard
        margins = _heldout_scores(self.scoped.net, shard, self.scoped.task, self.scoped.forward)[:, 1]
        keep = torch.sort(torch.argsort(margins, stable=True)[drop:]).values
        return shard.take(keep)


def _scoped(
    model: nn.Module,
    trusted: LabeledData,
    holdout: LabeledData,
    candidates: Sequence[Candidate],
    config: ScreeningConfig,
    task: Task,
    forward: ModuleForward | None,
    count: _Count,
) -> _Scoped:
    full = _Scoped(model, None, trusted, holdout, tuple(c.data for c in candidates), task, forward, count)
    if config.scope == "full":
        return full
    reads_more = sorted(holdout.extras) or (["the inputs its forward hook reads"] if forward is not None else [])
    if config.scope == "auto" and (reads_more or not has_head(model, config.feature_layer)):
        return full
    if reads_more:
        raise ScreeningInputError(
            f"head-scope screening computes features from the input alone, but the model also takes "
            f"{', '.join(reads_more)}: set scope='full'"
        )
    try:
        return _head_scoped(model, full, config)
    except ScreeningInputError:
        if config.scope == "auto":  # no head from there gives the model's own output (more code after it)
            return full
        raise


def _head_scoped(model: nn.Module, full: _Scoped, config: ScreeningConfig) -> _Scoped:
    """`full`'s data as the head's input features: the head alone fine-tunes, on features computed once per row."""
    split: HeadSplit = split_head(model, config.feature_layer, config.head_layers)
    # One pass over every row in the same batches: cuDNN picks kernels (TF32 among them) per batch shape, and the
    # calibration draws' features must come out of the same arithmetic as the candidates' to stay exchangeable.
    everything = torch.cat([full.trusted.x, full.holdout.x, *(c.x for c in full.candidates)])
    (features,) = head_features(model, split, [everything])
    sizes = [len(full.trusted), len(full.holdout), *(len(c) for c in full.candidates)]
    trusted_x, holdout_x, *parts = torch.split(features, sizes)
    return _Scoped(
        split.head,
        split.entry,
        LabeledData(trusted_x, full.trusted.y),
        LabeledData(holdout_x, full.holdout.y),
        tuple(LabeledData(x, c.y) for x, c in zip(parts, full.candidates, strict=True)),
        full.task,
        None,
        full.count,
    )


@dataclass(frozen=True)
class _Impacts:
    """What fine-tuning did to the held-out set: per checkpoint, how far each copy pushed the mean held-out margin
    down, overall and per class (copies x checkpoints * [overall, class...]); `base` is the deployed model's
    readout (rows x [soft accuracy, margin])."""

    base: torch.Tensor
    holdout_y: torch.Tensor
    num_classes: int
    per_class: bool

    @property
    def width(self) -> int:
        """Metrics per checkpoint."""
        return 1 + self.num_classes if self.per_class else 1

    def of(self, scores: torch.Tensor) -> np.ndarray:
        drops = self.base[:, 1].double() - scores[..., 1].double()  # copies x checkpoints x rows
        overall = drops.mean(-1, keepdim=True)
        if self.per_class:
            flat = drops.flatten(0, 1)
            per_class = per_class_mean(flat, self.holdout_y, self.num_classes).view(*drops.shape[:2], -1)
            overall = torch.cat([overall, per_class], -1)
        return overall.flatten(1).numpy()

    def soft_drop(self, scores: torch.Tensor) -> np.ndarray:
        """How much held-out soft accuracy each copy lost by its last step (the learning-rate probe's yardstick)."""
        return (self.base[:, 0].double().mean() - scores[:, -1, :, 0].double().mean(-1)).numpy()
