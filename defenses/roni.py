"""Reject On Negative Impact (Nelson et al.) per candidate shard or source, calibrated on known-good data.

Each candidate fine-tunes a copy of the current model for a fixed budget; its impact is how much the held-out soft
accuracy (mean probability of the true class, overall and per class) drops. The soft accuracy is bounded per row, so
a few hard held-out rows cannot dominate it as they dominate the cross-entropy. For other tasks (`task=`) the copies
fine-tune on the task's loss and the soft accuracy is the task's `soft_correct` (label probabilities for multilabel,
a Gaussian kernel of the error in tolerances for regression, a custom metric); the per-class rule is
classification's, other tasks are screened on the overall impact. Calibration shards of the same size
drawn from trusted data give the distribution of clean impacts; a candidate is rejected when an impact exceeds
median + k * MAD of that distribution. All copies (calibration and candidates) train together (`defenses.copies`).

The scope is the whole network for small models and, for large ones, the last layer(s) on features computed once
per row (`defenses.features`). The learning rate is the largest on a grid at which clean calibration copies stay
finite and keep their held-out soft accuracy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from trainguard.defenses.copies import finetune_heldout_probabilities
from trainguard.defenses.errors import ScreeningInputError
from trainguard.defenses.features import HeadSplit, head_features, parameter_count, split_head
from trainguard.defenses.forward import ModuleForward, plain_forward
from trainguard.defenses.heldout import LabeledData, per_class_mean
from trainguard.defenses.task import Task, as_task

MAD_TO_SIGMA = 1.4826  # makes the MAD a consistent estimate of a normal standard deviation
LR_GRID = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)


@dataclass(frozen=True)
class Candidate:
    """One shard (or the concatenated shards of one source) offered for this cycle's training."""

    name: str
    source: str
    data: LabeledData


@dataclass(frozen=True)
class ScreeningConfig:
    """Fine-tuning budget, scope and decision rule of the screening.

    `k` is how many robust standard deviations (1.4826 * MAD, at least `min_scale`) above the median calibration
    impact the overall impact may lie; `class_k` the same per class, in units of the median per-class robust
    deviation (pooled over classes, since a class whose calibration impacts barely vary would otherwise flag every
    small change). `min_scale` keeps a saturated model (clean impacts all ~0) from flagging every shard.
    `calibration_shards` clean shards are drawn (without replacement inside a shard) from the trusted data, each as
    large as the smallest candidate unless `calibration_size` is set.
    `lr="auto"` takes the largest rate of `lr_grid` at which every calibration copy stays finite and the median one
    loses at most `lr_tolerance` of held-out soft accuracy.
    `scope` "full" fine-tunes every parameter; "head" only the last `head_layers` Linear layers (or the module named
    by `feature_layer` and what follows it in its nn.Sequential) on frozen features; "auto" is "head" for models of
    more than `head_above` parameters. `chunk_size` bounds how many copies train at once (None: measured from
    memory on CUDA, 128 elsewhere); `batched=False` trains them one after another (same results, for comparison).
    """

    steps: int = 20
    lr: float | Literal["auto"] = "auto"
    lr_grid: tuple[float, ...] = LR_GRID
    lr_tolerance: float = 0.05
    k: float = 5.0
    class_k: float = 18.0
    min_scale: float = 1e-3
    per_class: bool = True
    calibration_shards: int = 40
    calibration_size: int | None = None
    num_classes: int | None = None
    scope: Literal["auto", "full", "head"] = "auto"
    feature_layer: str | None = None
    head_layers: int = 1
    head_above: int = 500_000
    chunk_size: int | None = None
    batched: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.k <= 0 or self.class_k <= 0 or self.min_scale < 0:
            raise ScreeningInputError(
                "screening config: steps >= 1, k > 0, class_k > 0 and min_scale >= 0 are required"
            )
        if self.lr != "auto" and not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ScreeningInputError("screening config: lr must be > 0 or 'auto'")
        if not self.lr_grid or min(self.lr_grid) <= 0 or not 0 < self.lr_tolerance <= 1:
            raise ScreeningInputError("screening config: lr_grid needs rates > 0 and lr_tolerance must be in (0, 1]")
        if self.calibration_shards < 5:
            raise ScreeningInputError(
                "screening config: at least 5 calibration shards are needed for robust statistics"
            )
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ScreeningInputError("screening config: chunk_size must be >= 1 (or None to size it from memory)")
        if self.scope not in ("auto", "full", "head") or self.head_layers < 1:
            raise ScreeningInputError("screening config: scope is 'auto', 'full' or 'head'; head_layers >= 1")


@dataclass(frozen=True)
class CandidateDecision:
    """Drop of the held-out soft accuracy caused by one candidate, the thresholds it was held to, and the verdict."""

    name: str
    source: str
    size: int
    impact: float
    threshold: float
    class_impacts: tuple[float, ...]
    class_thresholds: tuple[float, ...]
    score: float
    accepted: bool
    reason: str


@dataclass(frozen=True)
class ScreeningReport:
    """All decisions of one screening, with the calibration they were measured against and how the copies trained:
    `scope` "full" or "head" (then `head` names the module whose input was the frozen feature), the learning rate
    used and the copies trained at once."""

    decisions: tuple[CandidateDecision, ...]
    threshold: float
    class_thresholds: tuple[float, ...]
    calibration_impacts: tuple[float, ...]
    calibration_size: int
    config: ScreeningConfig
    seconds: float
    base_soft_accuracy: float
    scope: str
    head: str | None
    lr: float
    chunk_size: int

    @property
    def accepted(self) -> tuple[CandidateDecision, ...]:
        return tuple(d for d in self.decisions if d.accepted)

    @property
    def rejected(self) -> tuple[CandidateDecision, ...]:
        return tuple(d for d in self.decisions if not d.accepted)

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready data; non-finite numbers (classes absent from the held-out set) become None."""
        decisions = [
            {**asdict(d), "class_impacts": _finite(d.class_impacts), "class_thresholds": _finite(d.class_thresholds)}
            for d in self.decisions
        ]
        return {
            "threshold": self.threshold,
            "class_thresholds": _finite(self.class_thresholds),
            "calibration_impacts": list(self.calibration_impacts),
            "calibration_size": self.calibration_size,
            "base_soft_accuracy": self.base_soft_accuracy,
            "seconds": self.seconds,
            "scope": self.scope,
            "head": self.head,
            "lr": self.lr,
            "chunk_size": self.chunk_size,
            "config": asdict(self.config),
            "decisions": decisions,
        }


def _finite(values: Sequence[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values]


def robust_scale(values: Sequence[float]) -> float:
    """1.4826 * median absolute deviation: a standard deviation that a minority of outliers cannot inflate."""
    arr = np.asarray(values, dtype=np.float64)
    return float(MAD_TO_SIGMA * np.median(np.abs(arr - np.median(arr))))


def robust_threshold(values: Sequence[float], k: float, floor: float = 0.0) -> float:
    """median + k * max(robust_scale, floor): the largest impact still counted as clean."""
    if len(values) == 0:
        raise ScreeningInputError("robust threshold of an empty calibration set")
    return float(np.median(np.asarray(values, dtype=np.float64)) + k * max(robust_scale(values), floor))


def group_by_source(candidates: Sequence[Candidate]) -> list[Candidate]:
    """One candidate per source, concatenating its shards (names joined with '+'), in first-seen order."""
    groups: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        groups.setdefault(candidate.source, []).append(candidate)
    return [
        Candidate(name="+".join(c.name for c in group), source=source, data=LabeledData.concat([c.data for c in group]))
        for source, group in groups.items()
    ]


@torch.no_grad()
def _heldout_probabilities(
    model: nn.Module, holdout: LabeledData, task: Task, forward: ModuleForward | None
) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        batch = {name: value.to(device) for name, value in holdout.batch(slice(None)).items()}
        return task.soft_correct((forward or plain_forward)(model, batch, batch["x"]), batch["y"]).cpu()
    finally:
        model.train(was_training)


def _calibration_shards(trusted: LabeledData, size: int, count: int, seed: int) -> list[LabeledData]:
    if len(trusted) < size:
        raise ScreeningInputError(f"calibration needs shards of {size} rows but the trusted data has {len(trusted)}")
    rng = np.random.default_rng(seed)
    shards = []
    for _ in range(count):
        rows = torch.as_tensor(rng.choice(len(trusted), size=size, replace=False))
        shards.append(trusted.take(rows))
    return shards


def class_thresholds_of(values: np.ndarray, k: float, floor: float = 0.0) -> np.ndarray:
    """Per-class thresholds from calibration impacts (shards x classes): median_c + k * pooled robust scale.

    The scale is the median over classes of each class's robust scale (at least `floor`); a class absent from the
    held-out set (NaN) gets +inf.
    """
    present = ~np.isnan(values).all(0)
    out = np.full(values.shape[1], math.inf)
    if present.any():
        medians = np.array([np.median(values[:, c]) for c in np.flatnonzero(present)])
        scale = max(floor, float(np.median([robust_scale(values[:, c]) for c in np.flatnonzero(present)])))
        out[present] = medians + k * scale
    return out


def _decide(impact: float, threshold: float, class_impacts: np.ndarray, class_thresholds: np.ndarray) -> str:
    """'' when clean, else a one-line reason naming the metric that dropped too much (non-finite fails closed)."""
    if not math.isfinite(impact):
        return "held-out metrics became non-finite when fine-tuning on this candidate"
    if impact > threshold:
        return f"held-out soft accuracy dropped by {impact:.4f}, above the calibrated threshold {threshold:.4f}"
    with np.errstate(invalid="ignore"):
        over = np.nan_to_num(class_impacts - class_thresholds, nan=-math.inf)
    worst = int(np.argmax(over))
    if over[worst] > 0:
        return (
            f"held-out soft accuracy of class {worst} dropped by {class_impacts[worst]:.4f}, "
            f"above its calibrated threshold {class_thresholds[worst]:.4f}"
        )
    return ""


@dataclass(frozen=True)
class _Scoped:
    """The network each copy fine-tunes and the data in its input space (the frozen features for a head)."""

    net: nn.Module
    head: str | None
    trusted: LabeledData
    holdout: LabeledData
    candidates: tuple[LabeledData, ...]


def _scoped(
    model: nn.Module,
    trusted: LabeledData,
    holdout: LabeledData,
    candidates: Sequence[Candidate],
    config: ScreeningConfig,
) -> _Scoped:
    scope = config.scope
    if scope == "auto":
        scope = "head" if parameter_count(model) > config.head_above else "full"
    if scope == "full":
        return _Scoped(model, None, trusted, holdout, tuple(c.data for c in candidates))
    if holdout.extras:
        raise ScreeningInputError(
            f"head-scope screening computes features from the input alone, but the model also takes "
            f"{', '.join(holdout.extras)}: set scope='full'"
        )
    split: HeadSplit = split_head(model, config.feature_layer, config.head_layers)
    pooled = torch.cat([c.data.x for c in candidates])
    trusted_x, holdout_x, pooled_x = head_features(model, split, [trusted.x, holdout.x, pooled])
    parts = pooled_x.split([len(c.data) for c in candidates])
    return _Scoped(
        split.head,
        split.entry,
        LabeledData(trusted_x, trusted.y),
        LabeledData(holdout_x, holdout.y),
        tuple(LabeledData(x, c.data.y) for x, c in zip(parts, candidates, strict=True)),
    )


@dataclass(frozen=True)
class _Calibrated:
    lr: float
    probabilities: torch.Tensor
    chunk_size: int


def _calibrated(
    net: nn.Module,
    shards: Sequence[LabeledData],
    holdout: LabeledData,
    base: torch.Tensor,
    config: ScreeningConfig,
    task: Task,
    forward: ModuleForward | None,
) -> _Calibrated:
    """Calibration copies fine-tuned at the configured rate, or at the largest stable rate of the grid ('auto')."""
    rates = sorted(config.lr_grid, reverse=True) if config.lr == "auto" else [float(config.lr)]
    for lr in rates:
        run = finetune_heldout_probabilities(
            net,
            shards,
            holdout,
            lr=lr,
            steps=config.steps,
            chunk_size=config.chunk_size,
            batched=config.batched,
            task=task,
            forward=forward,
        )
        impacts = base.mean() - run.probabilities.double().mean(1)
        if not torch.isfinite(impacts).all():
            continue
        if config.lr != "auto" or float(impacts.median()) <= config.lr_tolerance:
            return _Calibrated(lr, run.probabilities, run.chunk_size)
    if config.lr != "auto":
        raise ScreeningInputError(
            f"screening diverged: fine-tuning with lr={config.lr} for {config.steps} steps gave non-finite held-out "
            "metrics on known-good calibration shards; lower ScreeningConfig.lr"
        )
    raise ScreeningInputError(
        f"screening found no stable learning rate in lr_grid={config.lr_grid}: on known-good calibration shards "
        f"every rate diverged or cost more than {config.lr_tolerance} held-out soft accuracy; add smaller rates"
    )


def screen_candidates(
    model: nn.Module,
    base_data: LabeledData,
    holdout: LabeledData,
    candidates: Sequence[Candidate],
    config: ScreeningConfig | None = None,
    *,
    task: Task | str | None = None,
    forward: ModuleForward | None = None,
) -> ScreeningReport:
    """Screens each candidate against calibration shards drawn from `base_data` (trusted, known-good data).

    `base_data` should be data the current model has not been fitted on (e.g. a trusted calibration split): clean
    data it already fits moves the held-out loss less than new clean data, which makes the screening stricter.
    `task` (default classification) sets the fine-tuning loss and the held-out soft accuracy; `forward(module,
    batch, x)` reads the model's extra inputs from `LabeledData.batch` (every data set then carries the same extras).
    """
    config = config or ScreeningConfig()
    task = as_task(task)
    if not candidates:
        raise ScreeningInputError("no candidates to screen")
    if len(holdout) == 0:
        raise ScreeningInputError("the held-out set is empty")
    for candidate in candidates:
        if len(candidate.data) == 0:
            raise ScreeningInputError(f"candidate {candidate.name!r} from source {candidate.source!r} is empty")
    for data in (base_data, *(c.data for c in candidates)):
        if sorted(data.extras) != sorted(holdout.extras):
            raise ScreeningInputError(
                f"the held-out set has extra inputs {sorted(holdout.extras)} but a screened data set has "
                f"{sorted(data.extras)}: give every data set the same extras"
            )
    for data in (holdout, base_data, *(c.data for c in candidates)):
        task.check_targets(data.y)
    started = time.perf_counter()
    by_class = task.kind == "classification"
    num_classes = (
        (config.num_classes or int(max(holdout.y.max(), base_data.y.max(), *(c.data.y.max() for c in candidates))) + 1)
        if by_class
        else 1
    )
    groups = holdout.y if by_class else torch.zeros(len(holdout), dtype=torch.int64)
    size = config.calibration_size or min(len(c.data) for c in candidates)
    scoped = _scoped(model, base_data, holdout, candidates, config)
    calibration = _calibration_shards(scoped.trusted, size, config.calibration_shards, config.seed)

    hook = forward if scoped.head is None else None
    base = _heldout_probabilities(scoped.net, scoped.holdout, task, hook).double()
    calibrated = _calibrated(scoped.net, calibration, scoped.holdout, base, config, task, hook)
    tried = finetune_heldout_probabilities(
        scoped.net,
        scoped.candidates,
        scoped.holdout,
        lr=calibrated.lr,
        steps=config.steps,
        chunk_size=config.chunk_size or calibrated.chunk_size,
        batched=config.batched,
        task=task,
        forward=hook,
    )
    probs = torch.cat([calibrated.probabilities, tried.probabilities]).double()
    impacts = (base.mean() - probs.mean(1)).numpy()
    class_impacts = (per_class_mean(base, groups, num_classes) - per_class_mean(probs, groups, num_classes)).numpy()

    n_cal = len(calibration)
    threshold = robust_threshold(impacts[:n_cal], config.k, config.min_scale)
    class_thresholds = (
        class_thresholds_of(class_impacts[:n_cal], config.class_k, config.min_scale)
        if config.per_class and by_class
        else np.full(num_classes, math.inf)
    )
    overall_scale = max(robust_scale(impacts[:n_cal]), config.min_scale) or 1e-12
    decisions = []
    for i, candidate in enumerate(candidates):
        j = n_cal + i
        reason = _decide(float(impacts[j]), threshold, class_impacts[j], class_thresholds)
        decisions.append(
            CandidateDecision(
                name=candidate.name,
                source=candidate.source,
                size=len(candidate.data),
                impact=float(impacts[j]),
                threshold=threshold,
                class_impacts=tuple(float(v) for v in class_impacts[j]),
                class_thresholds=tuple(float(v) for v in class_thresholds),
                score=float((impacts[j] - np.median(impacts[:n_cal])) / overall_scale),
                accepted=not reason,
                reason=reason or "impact within calibrated thresholds",
            )
        )
    return ScreeningReport(
        decisions=tuple(decisions),
        threshold=threshold,
        class_thresholds=tuple(float(v) for v in class_thresholds),
        calibration_impacts=tuple(float(v) for v in impacts[:n_cal]),
        calibration_size=size,
        config=config,
        seconds=time.perf_counter() - started,
        base_soft_accuracy=float(base.mean()),
        scope="full" if scoped.head is None else "head",
        head=scoped.head,
        lr=calibrated.lr,
        chunk_size=tried.chunk_size,
    )
