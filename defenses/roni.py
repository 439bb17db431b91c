"""Reject On Negative Impact (Nelson et al. 2009) per candidate shard and per source, with a stated error rate.

Each candidate fine-tunes a copy of the current model for a fixed budget; its impact is how far the mean held-out
margin (the true class's logit over the best other: `Task.margin`), overall and per class, is pushed down, read at
several checkpoints of the fine-tuning. The margin is linear in the outputs where the true-class probability
saturates on a confident model, so a few flipped labels register; the checkpoints matter because clean rows are fit
within a few steps while flipped ones keep pushing, and a concentrated push (a targeted flip, a backdoor) shows early
while later steps add the noise of the copy forgetting. For other tasks (`task=`) the copies fine-tune on the task's
loss and the margin is the task's; the per-class metrics are classification's, other tasks are screened on the
overall impact. All copies train together (`defenses.copies`).

The decision is a conformal test (`defenses.conformal`): a candidate is compared with clean calibration draws of
its own label histogram (stratified: per class, as many trusted rows of that class as the candidate holds). Size
matters (one fine-tune on 900 rows moves the model less than one on 50) and so does class composition: a clean shard
of 3 classes moves the other classes' held-out accuracy far more than an all-class draw does, and held to all-class
draws a clinic that sees a few conditions would be refused for what it is. Other tasks (`task=`), and
`stratify=False`, draw n rows from the whole pool instead, shared by sizes within `size_tolerance`. The overall and
per-class impacts at every checkpoint are reduced to one statistic (`conformal.Standardizer`: the largest, over
checkpoints, norm of the metrics pushed down), so per-class and per-checkpoint readings spend the same budget. Its
center and scale are fitted per candidate size and class set, on `SCALE_DRAWS` separate draws of that size from the
trusted rows of those classes (not per histogram: that would double the cost of every distinct histogram; the p-value
stays valid whatever fixed score is used, since the candidate and its histogram's draws are exchangeable under the
null).
The p-value is sequential (Besag & Clifford 1991): a histogram's draws are fine-tuned in stages, in batches, until
every candidate of that histogram has `sequential_hits` draws scoring at least its own or `calibration_draws` were
drawn, so a clearly clean candidate costs a few dozen draws. A class the trusted rows lack is drawn from all of
them (a fallback rather than a refusal, which would let one rare label stop the cycle; the draw keeps the
candidate's size, and that candidate's test is only approximate). Draws can only stand for fresh rows while they
need a small share of the trusted rows of a class: a draw of 50 rows of a class from 40 trusted ones repeats rows,
fine-tunes on fewer distinct examples and moves the model less than 50 fresh rows do, so a clean candidate's impact
looks large next to its draws (on digits with ~40 trusted rows per class, clean shards of 2-4 classes, tested whole,
were refused at 0.042 at level 0.01, their sources' unions at 8 times the level). A stratified candidate holding more
than `pool_fraction` of the trusted rows of a class is therefore tested on a seeded subsample with that many rows of
the class: the rate of any poison in it is kept, and its draws are as diverse as the candidate (clean 2-4 class
shards on digits, full scope: refused at 0.007, 2/288 over 6 seeds). The default share, 0.4, tests a targeted
shard whole where a quarter cut it (digits CNN, 30 trusted rows a class, 2 seeds: 3->8 flips caught at 0.85 with
0.25, 0.925 with 0.4); at the head scope's tuned rate on the MLP, clean 2-4 class shards are refused at 0.05-0.14
whatever the share (0.1 to whole): the rate, not the share, drives that mismatch.
Draws are a two-level bootstrap of the trusted data (per class when stratified): the pool is resampled,
then rows are drawn with replacement from the resample. A fresh contribution differs from the trusted pool by its
own sampling noise (variance ~ 1/n) plus the pool's (~ 1/N); drawing without replacement from the pool would have
neither the pool's noise nor, once n nears N, the shard's: calibration tighter than fresh shards, and clean
contributions rejected far more often than the level says.

No dilution: a source's shards are also judged together, by screening their union (histogram-matched) and by combining
the p-values of all its shard tests, earlier cycles' included (Brown's method: Fisher's for tests that share the
trusted sample, see `conformal`), and of any other test of the source's rows this cycle (`evidence`, e.g. the
label-issue detector's: flipped labels that each move the model a little are many rows the model confidently
disagrees with); a flagged source loses every shard. With
`error_control="per-candidate"` (the default) every clean shard is rejected with probability at most `level` (its
own test and its source's share the budget, Bonferroni); "bh" / "by" control the false discovery rate across the
cycle's shard and source tests instead.

The scope is by default the last layer(s) on features computed once per row (`defenses.features`), and the whole
network only where no Linear head gives the model's output, the model takes extra inputs or a forward hook, or when
asked (`scope="full"`). The learning
rate ("auto") is tuned on the trusted rows alone: of the rates on a grid at which clean probe copies stay finite and
keep their held-out soft accuracy, the one at which probe draws with a tenth of their labels flipped stand furthest
above clean ones. The rate decides most of the power: too large and the copies forget, which is noise in every
impact (digits CNN, head scope, stratified draws, 2 seeds: 10%-flipped shards caught at 0.17-0.40 at rate 0.05 and
0.87-0.92 at 0.02, targeted 3->8 flips at 0.07 against 0.98).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Literal, cast, get_args, overload

import numpy as np
import torch
from torch import nn
from typing_extensions import override

from trainguard.defenses.conformal import (
    Combination,
    ErrorControl,
    Standardizer,
    bonferroni_min,
    combined,
    sequential_p_value,
    step_up_adjusted,
)
from trainguard.defenses.copies import Finetuned, finetune_heldout_scores
from trainguard.defenses.errors import ScreeningInputError
from trainguard.defenses.features import HeadSplit, has_head, head_features, split_head
from trainguard.defenses.forward import ModuleForward, plain_forward
from trainguard.defenses.heldout import LabeledData, per_class_mean
from trainguard.defenses.task import Task, as_task

LR_GRID = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)
LR_PROBE_DRAWS = 40  # calibration draws that try each rate of the grid ("auto" lr)
PROBE_PATIENCE = 2  # stable rates in a row below the best separation that end the search
PROBE_FLIPS = 0.1  # labels moved in the probe's poisoned draws (classification): at random, or one class to another
SCALE_DRAWS = 50  # draws per size and class set that fit the standardisation, kept apart from the p-value draws
MIN_POOL_ROWS = 10  # trusted rows of a class below which its bootstrap draws stand for fresh rows only roughly
SCALE_STREAM, PROBE_STREAM, DRAW_STREAM = 0, 1, 2  # independent random streams; class c's part of a draw: 3 + c


@dataclass(frozen=True)
class Candidate:
    """One shard (or the concatenated shards of one source) offered for this cycle's training."""

    name: str
    source: str
    data: LabeledData


@dataclass(frozen=True)
class ScreeningConfig:
    """Fine-tuning budget, scope and decision rule of the screening.

    `level`: with `error_control` "per-candidate", the probability that a clean shard is rejected (its own test and
    its source's test get `level`/2 each where a source test exists); with "bh" / "by", the false discovery rate
    across the cycle's shard and source tests. At most `calibration_draws` clean draws per label histogram give the
    sequential p-values, which stop once `sequential_hits` draws score at least the candidate (the smallest p-value
    is 1 / (draws + 1), so `draws + 1 >= 4 / level` is required: a union test must be able to reject under the
    4-way split); `SCALE_DRAWS` more per size and class set fit each metric's center and scale. `stratify` draws
    each class's share of the candidate from that class's trusted rows (classification only); `pool_fraction`
    tests a stratified candidate on at most that share of the trusted rows of each class it holds (a seeded
    subsample; None: whole candidates). Unstratified, and
    for the scales, sizes within `size_tolerance` share the draws of the smallest of them (smaller draws vary more:
    the shared test is, if anything, lenient).
    `combination` merges a source's shard p-values (earlier cycles' included). `min_scale` is the measurable floor,
    in margin units: impacts are compared in steps of it (smaller differences tie, against the candidate) and no
    scale is below it, so a saturated model (clean impacts all ~0) does not turn rounding into evidence. `per_class`
    adds one metric per class to the statistic; `checkpoints` reads the held-out margins after that many steps,
    halving from `steps` (`marks`), and the statistic takes the worst of them.
    `lr="auto"` tries every rate of `lr_grid` on probe draws of the trusted rows; of the rates at which every probe
    copy stays finite and the median one loses at most `lr_tolerance` of held-out soft accuracy (the mean
    true-class probability), it takes the one at which the same draws with a tenth of their labels flipped stand
    furthest above the clean ones (classification; other tasks: the largest). Only trusted rows choose it, so
    candidates and their calibration draws stay exchangeable.
    `scope` "full" fine-tunes every parameter; "head" only the last `head_layers` Linear layers (or the module named
    by `feature_layer` and what follows it in its nn.Sequential) on frozen features; "auto" (the default) is "head"
    wherever there is one whose output is the model's (an nn.Linear, or `feature_layer`, with nothing after it in
    `forward`) and the model reads its input alone, else "full" (no such head, extra inputs or a forward hook). The
    head is the default whatever the model's size: full scope trains every copy through the whole network (issue
    #28: a first digits cycle took 41 minutes on two cores). `chunk_size` bounds how many copies train at once
    (None: measured from memory on CUDA, 128 elsewhere); `batched=False` trains them one after another (same
    results, for comparison).
    """

    steps: int = 20
    checkpoints: int = 4
    lr: float | Literal["auto"] = "auto"
    lr_grid: tuple[float, ...] = LR_GRID
    lr_tolerance: float = 0.02
    level: float = 0.01
    error_control: ErrorControl = "per-candidate"
    calibration_draws: int = 500
    sequential_hits: int = 10
    stratify: bool = True
    pool_fraction: float | None = 0.4
    combination: Combination = "brown"
    size_tolerance: float = 0.1
    min_scale: float = 1e-3
    per_class: bool = True
    num_classes: int | None = None
    scope: Literal["auto", "full", "head"] = "auto"
    feature_layer: str | None = None
    head_layers: int = 1
    chunk_size: int | None = None
    batched: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.checkpoints < 1 or self.min_scale < 0 or not 0 <= self.size_tolerance < 1:
            raise ScreeningInputError(
                "screening config: steps >= 1, checkpoints >= 1, min_scale >= 0 and size_tolerance in [0, 1) are "
                "required"
            )
        if self.seed < 0:
            raise ScreeningInputError("screening config: seed must be >= 0")
        if self.lr != "auto" and not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ScreeningInputError("screening config: lr must be > 0 or 'auto'")
        if not self.lr_grid or min(self.lr_grid) <= 0 or not 0 < self.lr_tolerance <= 1:
            raise ScreeningInputError("screening config: lr_grid needs rates > 0 and lr_tolerance must be in (0, 1]")
        if not 0 < self.level < 1:
            raise ScreeningInputError(f"screening config: level must be in (0, 1), got {self.level}")
        if self.calibration_draws + 1 < 4 / self.level:
            raise ScreeningInputError(
                f"screening config: {self.calibration_draws} calibration draws cannot reach p <= level/4 = "
                f"{self.level / 4:g} (the smallest p-value is 1/(draws+1)); use at least "
                f"{math.ceil(4 / self.level) - 1} draws or a larger level"
            )
        if self.pool_fraction is not None and not 0 < self.pool_fraction <= 1:
            raise ScreeningInputError("screening config: pool_fraction must be in (0, 1] or None")
        if not 1 <= self.sequential_hits <= self.calibration_draws:
            raise ScreeningInputError("screening config: sequential_hits must be in [1, calibration_draws]")
        if self.error_control not in get_args(ErrorControl) or self.combination not in get_args(Combination):
            raise ScreeningInputError(
                f"screening config: error_control is one of {get_args(ErrorControl)}; combination one of "
                f"{get_args(Combination)}"
            )
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ScreeningInputError("screening config: chunk_size must be >= 1 (or None to size it from memory)")
        if self.scope not in ("auto", "full", "head") or self.head_layers < 1:
            raise ScreeningInputError("screening config: scope is 'auto', 'full' or 'head'; head_layers >= 1")

    @property
    def marks(self) -> tuple[int, ...]:
        """The steps after which each copy's held-out margins are read: `checkpoints` of them, halving from `steps`
        (20 steps, 4 checkpoints: 3, 5, 10, 20)."""
        return tuple(sorted({math.ceil(self.steps / 2**k) for k in range(self.checkpoints)}))


@dataclass(frozen=True)
class ScaleCalibration:
    """The standardisation of candidates of one size and class set (`classes`; None: any), fitted on `SCALE_DRAWS`
    clean draws of `size` rows from the trusted rows of those classes."""

    size: int
    classes: tuple[int, ...] | None
    standardizer: Standardizer


@dataclass(frozen=True)
class Stratum:
    """Clean draws of one label histogram (`counts[c]` rows of class c; None: `size` rows of any class), their
    statistics (and overall impacts after the last step) in the order drawn: a sequential p-value counts a prefix of
    them."""

    size: int
    counts: tuple[int, ...] | None
    standardizer: Standardizer
    scores: tuple[float, ...]
    impacts: tuple[float, ...]


@dataclass(frozen=True)
class Calibration:
    """The learning rate, the scales and the strata of one model, trusted set and held-out set. A screening returns
    the one it used (extended by what it lacked), to pass to the next screening of the same three. `probed`: each
    rate the "auto" probe tried with its poisoned draws' separation (None: unstable, or not measured)."""

    lr: float
    chunk_size: int | None
    scope: str
    scales: tuple[ScaleCalibration, ...] = ()
    strata: tuple[Stratum, ...] = ()
    probed: tuple[tuple[float, float | None], ...] = ()

    def scale(self, size: int, classes: tuple[int, ...] | None, tolerance: float) -> ScaleCalibration | None:
        """The largest calibrated size <= `size` within `tolerance` of it, same classes (a lenient match)."""
        fits = [c for c in self.scales if c.classes == classes and size * (1 - tolerance) <= c.size <= size]
        return max(fits, key=lambda c: c.size, default=None)


def _stratum_match(
    strata: Sequence[Stratum], size: int, counts: tuple[int, ...] | None, tolerance: float
) -> int | None:
    """Index of the stratum of exactly these `counts`; unstratified, of the largest size <= `size` within
    `tolerance` of it (smaller draws vary more: a lenient match)."""
    if counts is not None:
        return next((i for i, s in enumerate(strata) if s.counts == counts), None)
    fits = [i for i, s in enumerate(strata) if s.counts is None and size * (1 - tolerance) <= s.size <= size]
    return max(fits, key=lambda i: strata[i].size, default=None)


@dataclass(frozen=True)
class CandidateDecision:
    """One shard's test: its impacts after the last step (`impact` overall, `class_impacts` per class: how far the
    mean held-out margin was pushed down), its statistic (`score`) and p-value against `calibration_size`-row draws,
    its source's p-value, the adjusted p-value compared with the level, and the verdict with a one-line reason."""

    name: str
    source: str
    size: int
    impact: float
    class_impacts: tuple[float, ...]
    score: float
    p_value: float
    source_p_value: float | None
    adjusted_p_value: float
    calibration_size: int
    accepted: bool
    reason: str


@dataclass(frozen=True)
class SourceDecision:
    """A source judged as a whole: the union of its shards screened size-matched (when it has several this cycle),
    the combination of all its shard p-values (`earlier` of them from previous cycles), and whether it is flagged
    (then every shard of it is rejected). `evidence`: the other tests' p-values that joined the combination;
    `class_impacts`: the union's per-class drops of the held-out margin (empty without a union)."""

    source: str
    shards: tuple[str, ...]
    rows: int
    union_impact: float | None
    union_p_value: float | None
    combined_p_value: float
    earlier: int
    p_value: float
    adjusted_p_value: float
    flagged: bool
    reason: str
    evidence: tuple[float, ...] = ()
    class_impacts: tuple[float, ...] = ()


@dataclass(frozen=True)
class ScreeningReport:
    """All decisions of one screening, the calibration they were measured against and how the copies trained:
    `scope` "full" or "head" (then `head` names the module whose input was the frozen feature), the learning rate
    used and the copies trained at once."""

    decisions: tuple[CandidateDecision, ...]
    sources: tuple[SourceDecision, ...]
    calibration: Calibration
    config: ScreeningConfig
    seconds: float
    base_soft_accuracy: float
    head: str | None

    @property
    def accepted(self) -> tuple[CandidateDecision, ...]:
        return tuple(d for d in self.decisions if d.accepted)

    @property
    def rejected(self) -> tuple[CandidateDecision, ...]:
        return tuple(d for d in self.decisions if not d.accepted)

    @property
    def scope(self) -> str:
        return self.calibration.scope

    @property
    def lr(self) -> float:
        return self.calibration.lr

    @property
    def chunk_size(self) -> int | None:
        return self.calibration.chunk_size

    @property
    def flagged(self) -> tuple[SourceDecision, ...]:
        return tuple(s for s in self.sources if s.flagged)

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready data; non-finite numbers (classes absent from the held-out set) become None."""
        decisions = [
            {**asdict(d), "class_impacts": _finite(d.class_impacts), "score": _number(d.score)} for d in self.decisions
        ]
        calibration = [
            {
                "size": c.size,
                "counts": None if c.counts is None else list(c.counts),
                "draws": len(c.scores),
                "impact_quantiles": _quantiles(c.impacts),
                "score_quantiles": _quantiles(c.scores),
            }
            for c in self.calibration.strata
        ]
        return {
            "level": self.config.level,
            "error_control": self.config.error_control,
            "combination": self.config.combination,
            "calibration": calibration,
            "base_soft_accuracy": self.base_soft_accuracy,
            "seconds": self.seconds,
            "scope": self.calibration.scope,
            "head": self.head,
            "lr": self.calibration.lr,
            "lr_probe": [{"lr": lr, "separation": separation} for lr, separation in self.calibration.probed],
            "chunk_size": self.calibration.chunk_size,
            "config": asdict(self.config),
            "decisions": decisions,
            "sources": [
                {**asdict(s), "union_impact": _number(s.union_impact), "class_impacts": _finite(s.class_impacts)}
                for s in self.sources
            ],
        }


def _number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _finite(values: Sequence[float]) -> list[float | None]:
    return [_number(v) for v in values]


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    qs = np.quantile(np.asarray(values, dtype=np.float64), [0.5, 0.9, 0.99, 1.0])
    return {"median": float(qs[0]), "q90": float(qs[1]), "q99": float(qs[2]), "max": float(qs[3])}


def group_by_source(candidates: Sequence[Candidate]) -> list[Candidate]:
    """One candidate per source, concatenating its shards (names joined with '+'), in first-seen order."""
    groups: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        groups.setdefault(candidate.source, []).append(candidate)
    return [
        Candidate(name="+".join(c.name for c in group), source=source, data=LabeledData.concat([c.data for c in group]))
        for source, group in groups.items()
    ]


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


class _Draws(Sequence[LabeledData]):
    """Calibration shards as row indices into the trusted data, materialised a chunk at a time (thousands of large
    draws of frozen features would not fit in memory at once)."""

    def __init__(self, trusted: LabeledData, rows: Sequence[np.ndarray] | np.ndarray) -> None:
        self.trusted = trusted
        self.rows = rows

    @override
    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> LabeledData: ...
    @overload
    def __getitem__(self, index: slice) -> list[LabeledData]: ...
    @override
    def __getitem__(self, index: int | slice) -> LabeledData | list[LabeledData]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.trusted.take(torch.as_tensor(self.rows[index]))


def bootstrap_draws(
    pool_size: int, size: int, count: int, seed: int, stream: int = SCALE_STREAM, start: int = 0
) -> np.ndarray:
    """Row indices (count x size) of clean draws `start`, `start + 1`, ... of a stream: each resamples the pool,
    then draws `size` rows with replacement from that resample, so a draw varies like a fresh shard compared with
    the pool (both noises, see the module)."""
    if pool_size < 1:
        raise ScreeningInputError("calibration needs trusted rows to draw from; the trusted data is empty")
    rng = np.random.default_rng([stream, size, seed, start])
    resampled = rng.integers(0, pool_size, size=(count, pool_size))
    return np.take_along_axis(resampled, rng.integers(0, pool_size, size=(count, size)), axis=1)


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


def stratified_draws(labels: np.ndarray, counts: Sequence[int], count: int, seed: int, start: int = 0) -> np.ndarray:
    """Row indices (count x sum(counts)) of clean draws holding `counts[c]` rows of class c: per class, the
    two-level bootstrap of the trusted rows of that class (a class they lack: of all trusted rows)."""
    parts = []
    for label, k in enumerate(counts):
        if k == 0:
            continue
        pool = np.flatnonzero(labels == label)
        pool = pool if pool.size else np.arange(len(labels))
        parts.append(pool[bootstrap_draws(pool.size, k, count, seed, DRAW_STREAM + 1 + label, start)])
    return np.concatenate(parts, axis=1)


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
        """Held-out soft accuracy and margin of one copy per shard at each checkpoint (`defenses.copies`)."""
        return finetune_heldout_scores(
            self.net,
            shards,
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


def _learning_rate(
    scoped: _Scoped, size: int, impacts: _Impacts, config: ScreeningConfig
) -> tuple[float, int, tuple[tuple[float, float | None], ...]]:
    """The rate of the grid at which probe copies stay finite and keep their held-out soft accuracy (within
    `lr_tolerance`) and, for classification, at which poisoned probe draws (`_poisoned`) stand furthest above clean
    draws of the same label histograms (else the largest such rate), with the copies per chunk the probe measured
    and each rate's separation. Rates are tried from the largest down, until `PROBE_PATIENCE` stable ones in a row
    separate less than the best."""
    labels = scoped.trusted.y.numpy()
    drawn = bootstrap_draws(len(labels), size, LR_PROBE_DRAWS, config.seed, PROBE_STREAM)
    probe: list[LabeledData] = list(_Draws(scoped.trusted, drawn))
    if impacts.per_class:
        rng = np.random.default_rng([PROBE_STREAM, config.seed, size])
        poisoned = [_poisoned(draw, impacts.num_classes, rng, i % 2 == 1) for i, draw in enumerate(probe)]
        twins = [_clean_twins(labels, draw.y, impacts.num_classes, config, i) for i, draw in enumerate(poisoned)]
        probe = [*_Draws(scoped.trusted, [t[0] for t in twins]), *_Draws(scoped.trusted, [t[1] for t in twins])]
        probe += poisoned
    best: tuple[float, float, int] | None = None
    probed: list[tuple[float, float | None]] = []
    for tried, lr in enumerate(sorted(config.lr_grid, reverse=True)):
        scoped.count.plan(len(probe) - (0 if tried else LR_PROBE_DRAWS))  # one probe was planned with the screening
        run = scoped.finetuned(probe, lr, config, config.chunk_size)
        lost = impacts.soft_drop(run.scores[:LR_PROBE_DRAWS])
        if not np.isfinite(lost).all() or float(np.median(lost)) > config.lr_tolerance:
            probed.append((lr, None))
            continue
        if len(probe) == LR_PROBE_DRAWS:
            return lr, run.chunk_size, (*probed, (lr, None))
        separation = _separation(impacts.of(run.scores), impacts.width, config.min_scale)
        probed.append((lr, separation))
        if best is None or separation > best[0]:
            best = (separation, lr, run.chunk_size)
        elif all(v is not None and v < best[0] for _, v in probed[-PROBE_PATIENCE:]):
            break  # smaller rates only move the copies less: the separation has peaked
    if best is None:
        raise ScreeningInputError(
            f"screening found no stable learning rate in lr_grid={config.lr_grid}: on known-good calibration shards "
            f"every rate diverged or cost more than {config.lr_tolerance} held-out soft accuracy; add smaller rates"
        )
    return best[1], best[2], tuple(probed)


def _poisoned(draw: LabeledData, num_classes: int, rng: np.random.Generator, targeted: bool) -> LabeledData:
    """`draw` with `PROBE_FLIPS` of its labels (at least one) moved to other classes: at random, or `targeted`, rows
    of one class present all moved to one other class."""
    y = draw.y.clone()
    budget = max(1, round(PROBE_FLIPS * len(y)))
    if targeted:
        source = int(rng.choice(np.unique(y.numpy())))
        rows = torch.as_tensor(np.flatnonzero(y.numpy() == source)[:budget])
        y[rows] = (source + int(rng.integers(1, num_classes))) % num_classes
    else:
        rows = torch.as_tensor(rng.choice(len(y), budget, replace=False))
        y[rows] = (y[rows] + torch.as_tensor(rng.integers(1, num_classes, len(rows)))) % num_classes
    return LabeledData(draw.x, y, draw.extras)


def _clean_twins(labels: np.ndarray, y: torch.Tensor, num_classes: int, config: ScreeningConfig, i: int) -> np.ndarray:
    """Trusted row indices (2 x len(y)) of two clean draws with the label histogram of `y` (stratified, as the test
    compares; else of its size)."""
    if not config.stratify:
        return bootstrap_draws(len(labels), len(y), 2, config.seed, PROBE_STREAM + 1, 2 * i)
    counts = torch.bincount(y.long(), minlength=num_classes).tolist()
    return stratified_draws(labels, counts, 2, config.seed + PROBE_STREAM, 2 * i)


def _separation(values: np.ndarray, width: int, floor: float) -> float:
    """How far poisoned probe draws stand above clean draws of their own label histograms, in clean scales. `values`
    holds three equal parts: clean twins A, clean twins B, poisoned draws; B - A is the clean spread within a
    histogram, poisoned - A the poison's push. The median push's score less the clean spread's 90th percentile."""
    first, second, poisoned = np.split(values, 3)
    standardizer = Standardizer.fit(second - first, floor, width)
    return float(np.median(standardizer.score(poisoned - first)) - np.quantile(standardizer.score(second - first), 0.9))


@dataclass(frozen=True)
class _Key:
    """What a candidate's calibration depends on: its size and, stratified, its label histogram."""

    size: int
    counts: tuple[int, ...] | None

    @property
    def classes(self) -> tuple[int, ...] | None:
        return None if self.counts is None else tuple(c for c, k in enumerate(self.counts) if k)


def _key(data: LabeledData, num_classes: int | None) -> _Key:
    """`num_classes` None: unstratified (other tasks, or `stratify=False`)."""
    if num_classes is None:
        return _Key(len(data), None)
    return _Key(len(data), tuple(int(k) for k in torch.bincount(data.y.long(), minlength=num_classes).tolist()))


def supported_level(pool_rows: int) -> float:
    """The smallest error rate calibration draws from `pool_rows` trusted rows of a class can stand for, at best: a
    fresh row lies beyond all of them (on any one reading) with probability 1 / (pool_rows + 1), and no draw of
    them ever does."""
    return 1.0 / (pool_rows + 1)


def class_cap(pool_rows: int, fraction: float) -> int:
    """The most rows of one class a stratified candidate is tested on, with `pool_rows` trusted rows of that class
    (`ScreeningConfig.pool_fraction`: draws can stand for fresh rows only while they need a small share of them)."""
    return max(1, int(fraction * pool_rows))


def _within_pool(candidate: Candidate, pool: np.ndarray, fraction: float, seed: int) -> Candidate:
    """The candidate, or a seeded subsample holding at most `fraction` of the trusted rows (`pool`: per class) of
    each class: what clean draws of the trusted rows can stand for (see the module docstring)."""
    labels = candidate.data.y.long().numpy()
    rng = np.random.default_rng([seed, *candidate.name.encode()])
    keep = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        limit = class_cap(int(pool[label]) if label < len(pool) else 0, fraction)
        keep.append(rows if len(rows) <= limit else np.sort(rng.choice(rows, limit, replace=False)))
    rows = np.concatenate(keep)
    if len(rows) == len(labels):
        return candidate
    return Candidate(candidate.name, candidate.source, candidate.data.take(torch.as_tensor(np.sort(rows))))


def _subsampled(size: int, tested: int) -> str:
    """How a reason says that a candidate was tested on a subsample (`pool_fraction`)."""
    return f" (tested on a seeded {tested}-row subsample of its {size} rows)" if tested < size else ""


def _clean_impacts(
    scoped: _Scoped,
    rows: Sequence[np.ndarray],
    lr: float,
    chunk_size: int | None,
    impacts: _Impacts,
    config: ScreeningConfig,
) -> tuple[np.ndarray, int]:
    """The impacts of clean draws (trusted row indices), failing closed when a copy diverged."""
    scoped.count.plan(len(rows))
    run = scoped.finetuned(_Draws(scoped.trusted, rows), lr, config, chunk_size)
    values = impacts.of(run.scores)
    if not np.isfinite(values[:, :: impacts.width]).all():
        raise ScreeningInputError(
            f"screening diverged: fine-tuning with lr={lr} for {config.steps} steps gave non-finite held-out metrics "
            f"on known-good calibration draws; lower ScreeningConfig.lr"
        )
    return values, run.chunk_size


def _with_scales(
    scoped: _Scoped, keys: Sequence[_Key], calibration: Calibration, impacts: _Impacts, config: ScreeningConfig
) -> Calibration:
    """`calibration` with a scale for every key's size and class set: `SCALE_DRAWS` draws each from the trusted rows
    of those classes, all fine-tuned together (split conformal: the p-value draws never fit the scale)."""
    known = [(c.size, c.classes) for c in calibration.scales]
    fresh = []
    for key in sorted(set(keys), key=lambda k: (k.size, k.counts or ())):
        low = key.size * (1 - config.size_tolerance)
        if not any(classes == key.classes and low <= size <= key.size for size, classes in known):
            fresh.append(key)
            known.append((key.size, key.classes))
    if not fresh:
        return calibration
    labels = scoped.trusted.y.numpy()
    rows = []
    for key in fresh:
        pool = np.flatnonzero(np.isin(labels, key.classes)) if key.classes is not None else np.arange(len(labels))
        pool = pool if pool.size else np.arange(len(labels))
        rows.extend(pool[bootstrap_draws(pool.size, key.size, SCALE_DRAWS, config.seed, SCALE_STREAM)])
    values, chunk = _clean_impacts(scoped, rows, calibration.lr, calibration.chunk_size, impacts, config)
    fitted = [
        ScaleCalibration(
            key.size,
            key.classes,
            Standardizer.fit(values[i * SCALE_DRAWS : (i + 1) * SCALE_DRAWS], config.min_scale, impacts.width),
        )
        for i, key in enumerate(fresh)
    ]
    ordered = tuple(sorted((*calibration.scales, *fitted), key=lambda c: (c.size, c.classes or ())))
    return replace(calibration, chunk_size=calibration.chunk_size or chunk, scales=ordered)


def _calibrated(
    scoped: _Scoped, keys: Sequence[_Key], impacts: _Impacts, config: ScreeningConfig, given: Calibration | None
) -> Calibration:
    """`given` (or a new calibration at the learning rate found for the smallest size) with every key's scale."""
    calibration = given
    if calibration is None:
        scope = "full" if scoped.head is None else "head"
        if config.lr == "auto":
            lr, chunk, probed = _learning_rate(scoped, min(k.size for k in keys), impacts, config)
            calibration = Calibration(lr, config.chunk_size or chunk, scope, probed=probed)
        else:
            calibration = Calibration(float(config.lr), config.chunk_size, scope)
    return _with_scales(scoped, keys, calibration, impacts, config)


def _strata_of(
    keys: Sequence[_Key], calibration: Calibration, config: ScreeningConfig
) -> tuple[list[Stratum], list[int]]:
    """The strata the keys are tested against (the calibration's, or new empty ones) and each key's index in them;
    unstratified keys are taken smallest first, so larger sizes within the tolerance share a smaller one's draws."""
    strata = list(calibration.strata)
    index: dict[_Key, int] = {}
    for key in sorted(set(keys), key=lambda k: (k.size, k.counts or ())):
        found = _stratum_match(strata, key.size, key.counts, config.size_tolerance)
        if found is None:
            scale = calibration.scale(key.size, key.classes, config.size_tolerance)
            if scale is None:
                raise ScreeningInputError(f"no scale was fitted for {key.size}-row candidates of classes {key.classes}")
            strata.append(Stratum(key.size, key.counts, scale.standardizer, (), ()))
            found = len(strata) - 1
        index[key] = found
    return strata, [index[k] for k in keys]


@dataclass(frozen=True)
class _Tested:
    """One fine-tuned candidate (a shard or a source's union) against its stratum's draws."""

    impacts: np.ndarray
    score: float
    p_value: float
    calibration: Stratum

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.impacts[:: self.calibration.standardizer.width]).all())

    @property
    def last(self) -> np.ndarray:
        """The impacts after the last step: overall, then per class."""
        return self.impacts[-self.calibration.standardizer.width :]

    def worst(self, marks: Sequence[int]) -> str:
        """Which metric, after how many of the steps (`marks`: the checkpoints), was pushed furthest."""
        width = self.calibration.standardizer.width
        z = self.calibration.standardizer.standardized(self.impacts[None, :])[0]
        index = int(np.nanargmax(np.where(np.isnan(z), -math.inf, z)))
        mark, metric = divmod(index, width)
        what = "held-out margin" if metric == 0 else f"held-out margin of class {metric - 1}"
        return (
            f"{what} pushed down by {self.impacts[index]:.4f} ({z[index]:.1f} clean scales) after {marks[mark]} of "
            f"{marks[-1]} steps"
        )


def _sequential(
    scoped: _Scoped,
    keys: Sequence[_Key],
    values: np.ndarray,
    calibration: Calibration,
    impacts: _Impacts,
    config: ScreeningConfig,
) -> tuple[Calibration, list[_Tested]]:
    """Each candidate's sequential p-value against the draws of its stratum: undecided strata get a stage of new
    draws (twice `sequential_hits` at first, then as many as they hold, at most `calibration_draws` in all), all
    strata's stages fine-tuned together, until every candidate is decided."""
    strata, where = _strata_of(keys, calibration, config)
    scores = [float(strata[s].standardizer.score(values[i][None, :])[0]) for i, s in enumerate(where)]
    hits, limit = config.sequential_hits, config.calibration_draws
    chunk = calibration.chunk_size
    labels = scoped.trusted.y.numpy()
    while True:
        stages = {}
        for s in sorted(set(where)):
            have = len(strata[s].scores)
            mine = [scores[i] for i, w in enumerate(where) if w == s]
            if any(sequential_p_value(strata[s].scores, score, hits, limit) is None for score in mine):
                stages[s] = min(limit - have, max(2 * hits, have))
        if not stages:
            break
        rows: list[np.ndarray] = []
        for s, count in stages.items():
            stratum, have = strata[s], len(strata[s].scores)
            if stratum.counts is None:
                rows.extend(bootstrap_draws(len(labels), stratum.size, count, config.seed, DRAW_STREAM, have))
            else:
                rows.extend(stratified_draws(labels, stratum.counts, count, config.seed, have))
        drawn, measured = _clean_impacts(scoped, rows, calibration.lr, chunk, impacts, config)
        chunk = chunk or measured
        offset = 0
        for s, count in stages.items():
            part, offset = drawn[offset : offset + count], offset + count
            stratum = strata[s]
            strata[s] = Stratum(
                stratum.size,
                stratum.counts,
                stratum.standardizer,
                (*stratum.scores, *stratum.standardizer.score(part).tolist()),
                (*stratum.impacts, *part[:, -impacts.width].tolist()),
            )
    tests = [
        _Tested(
            values[i],
            scores[i],
            float(cast(float, sequential_p_value(strata[s].scores, scores[i], hits, limit))),
            strata[s],
        )
        for i, s in enumerate(where)
    ]
    ordered = tuple(sorted(strata, key=lambda s: (s.size, s.counts or ())))
    return replace(calibration, chunk_size=chunk, strata=ordered), tests


def screen_candidates(
    model: nn.Module,
    base_data: LabeledData,
    holdout: LabeledData,
    candidates: Sequence[Candidate],
    config: ScreeningConfig | None = None,
    *,
    history: Mapping[str, Sequence[float]] | None = None,
    evidence: Mapping[str, Sequence[float]] | None = None,
    calibration: Calibration | None = None,
    task: Task | str | None = None,
    forward: ModuleForward | None = None,
    progress: ScreeningProgress | None = None,
) -> ScreeningReport:
    """Screens each candidate shard and each source against clean draws from `base_data` (trusted data).

    `base_data` should be data the current model has not been fitted on (e.g. a trusted calibration split) and
    representative of contributions: clean data the model already fits moves the held-out set less than new clean
    data, which makes the screening stricter. `history` maps a source to its shard p-values of earlier cycles (they
    join its combined p-value). `evidence` maps a source to p-values of other tests of its rows this cycle (the
    label-issue detector's, `pipeline.detection`); they join the combination too (Brown's method assumes them correlated
    with the shard tests as those are with each other). `calibration`, from an earlier report on the same
    model, trusted and held-out data, skips the draws it already holds. `task` (default classification) sets the
    fine-tuning loss and the held-out soft accuracy; `forward(module, batch, x)` reads the model's extra inputs from
    `LabeledData.batch` (every data set then carries the same extras). `progress(done, planned)` counts the
    fine-tuned copies (calibration draws and candidates) for a display.
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
    if len({c.name for c in candidates}) != len(candidates):
        raise ScreeningInputError("candidate names must be unique")
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
    shards_of = Counter(c.source for c in candidates)
    unions = [u for u in group_by_source(candidates) if shards_of[u.source] > 1]
    tried = [*candidates, *unions]
    if by_class and config.stratify and config.pool_fraction is not None:
        pool = np.bincount(base_data.y.long().numpy(), minlength=num_classes)
        tried = [_within_pool(c, pool, config.pool_fraction, config.seed) for c in tried]
    count = _Count(progress)
    probing = calibration is None and config.lr == "auto"
    count.plan(probing * LR_PROBE_DRAWS + len(tried))  # clean draws are planned stage by stage, as they are drawn
    scoped = _scoped(model, base_data, holdout, tried, config, task, forward, count)
    base = _heldout_scores(scoped.net, scoped.holdout, task, scoped.forward).double()
    impacts = _Impacts(base, holdout.y, num_classes, config.per_class and by_class)
    keys = [_key(c.data, num_classes if by_class and config.stratify else None) for c in tried]
    calibration = _calibrated(scoped, keys, impacts, config, calibration)
    run = scoped.finetuned(scoped.candidates, calibration.lr, config, calibration.chunk_size)
    values = impacts.of(run.scores)
    calibration, tests = _sequential(scoped, keys, values, calibration, impacts, config)
    shard_tests = tests[: len(candidates)]
    union_tests = dict(zip([u.source for u in unions], tests[len(candidates) :], strict=True))
    tested = [len(c.data) for c in tried[: len(candidates)]]
    sources = _source_evidence(
        candidates, tested, len(base_data), shard_tests, union_tests, history or {}, evidence or {}, config
    )
    decisions, source_decisions = _decide(candidates, tested, shard_tests, sources, config)
    return ScreeningReport(
        decisions=decisions,
        sources=source_decisions,
        calibration=calibration,
        config=config,
        seconds=time.perf_counter() - started,
        base_soft_accuracy=float(base[:, 0].mean()),
        head=scoped.head,
    )


@dataclass(frozen=True)
class _SourceEvidence:
    source: str
    shards: tuple[str, ...]
    rows: int
    union: _Tested | None
    combined_p: float
    earlier: int
    other: tuple[float, ...]

    @property
    def p_value(self) -> float:
        """Union and combination as one test (Bonferroni: they are far from independent)."""
        tests = [self.combined_p] if self.union is None else [self.combined_p, self.union.p_value]
        return bonferroni_min(tests)


def _source_evidence(
    candidates: Sequence[Candidate],
    tested: Sequence[int],
    trusted_rows: int,
    tests: Sequence[_Tested],
    unions: Mapping[str, _Tested],
    history: Mapping[str, Sequence[float]],
    evidence: Mapping[str, Sequence[float]],
    config: ScreeningConfig,
) -> dict[str, _SourceEvidence]:
    """Sources with more than one test (this cycle's shards, earlier cycles' and other evidence): judged whole.
    `tested`: the rows each candidate was fine-tuned on; with `trusted_rows` they give the correlation Brown's method
    assumes between a source's tests (a shard of n rows shares the trusted sample's noise: n / (n + trusted_rows))."""
    out = {}
    for source in dict.fromkeys(c.source for c in candidates):
        mine = [i for i, c in enumerate(candidates) if c.source == source]
        earlier = [float(p) for p in history.get(source, ())]
        other = tuple(float(p) for p in evidence.get(source, ()))
        if len(mine) + len(earlier) + len(other) < 2:
            continue
        p_values = [*earlier, *(tests[i].p_value for i in mine), *other]
        rows = float(np.median([tested[i] for i in mine]))
        out[source] = _SourceEvidence(
            source,
            tuple(candidates[i].name for i in mine),
            sum(len(candidates[i].data) for i in mine),
            unions.get(source),
            combined(p_values, config.combination, rows / (rows + trusted_rows)),
            len(earlier),
            other,
        )
    return out


def _decide(
    candidates: Sequence[Candidate],
    tested: Sequence[int],
    tests: Sequence[_Tested],
    sources: Mapping[str, _SourceEvidence],
    config: ScreeningConfig,
) -> tuple[tuple[CandidateDecision, ...], tuple[SourceDecision, ...]]:
    """Adjusted p-values per shard and per source, compared with the level; non-finite impacts fail closed.
    `tested`: the rows each candidate was fine-tuned on (fewer than its own when subsampled)."""
    shard_p = np.array([t.p_value for t in tests])
    source_p = np.array([s.p_value for s in sources.values()])
    if config.error_control == "per-candidate":
        adjusted_sources = np.minimum(1.0, 2 * source_p)
        adjusted_shards = np.array(
            [min(1.0, 2 * p) if c.source in sources else p for p, c in zip(shard_p, candidates, strict=True)]
        )
    else:
        both = step_up_adjusted(np.concatenate([shard_p, source_p]), config.error_control)
        adjusted_shards, adjusted_sources = both[: len(shard_p)], both[len(shard_p) :]
    source_decisions = {
        s.source: _source_decision(s, float(a), config) for s, a in zip(sources.values(), adjusted_sources, strict=True)
    }
    decisions = []
    for candidate, rows, test, own in zip(candidates, tested, tests, adjusted_shards, strict=True):
        source = source_decisions.get(candidate.source)
        adjusted = min(float(own), source.adjusted_p_value) if source else float(own)
        if not test.finite:
            reason = "held-out metrics became non-finite when fine-tuning on this candidate"
        elif own <= config.level:
            reason = (
                f"p-value {test.p_value:.3g} (adjusted {own:.3g}) <= level {config.level:g}: "
                f"{test.worst(config.marks)} against clean {test.calibration.size}-row draws"
                f"{'' if test.calibration.counts is None else ' of its label histogram'}"
                f"{_subsampled(len(candidate.data), rows)}"
            )
        elif source is not None and source.flagged:
            reason = source.reason
        else:
            reason = f"p-value {test.p_value:.3g} (adjusted {adjusted:.3g}) above level {config.level:g}"
        decisions.append(
            CandidateDecision(
                name=candidate.name,
                source=candidate.source,
                size=len(candidate.data),
                impact=float(test.last[0]),
                class_impacts=tuple(float(v) for v in test.last[1:]),
                score=test.score,
                p_value=test.p_value,
                source_p_value=source.p_value if source else None,
                adjusted_p_value=adjusted,
                calibration_size=test.calibration.size,
                accepted=test.finite and adjusted > config.level,
                reason=reason,
            )
        )
    return tuple(decisions), tuple(source_decisions.values())


def _source_decision(evidence: _SourceEvidence, adjusted: float, config: ScreeningConfig) -> SourceDecision:
    union = evidence.union
    broken = union is not None and not union.finite
    flagged = broken or adjusted <= config.level
    tested = len(evidence.shards) + evidence.earlier
    others = (
        f" and {len(evidence.other)} detector p-value{'s' if len(evidence.other) > 1 else ''}" if evidence.other else ""
    )
    parts = [
        f"{config.combination} over {tested} shard tests ({evidence.earlier} earlier){others} "
        f"p={evidence.combined_p:.3g}"
    ]
    if union is not None:
        parts.append(f"union of {evidence.rows} rows p={union.p_value:.3g}")
    verdict = ("flagged", "<=") if flagged else ("not flagged", "above")
    reason = (
        f"source {evidence.source} {verdict[0]}: combined p-value {evidence.p_value:.3g} (adjusted {adjusted:.3g}) "
        f"{verdict[1]} level {config.level:g}; {', '.join(parts)}"
    )
    return SourceDecision(
        source=evidence.source,
        shards=evidence.shards,
        rows=evidence.rows,
        union_impact=float(union.last[0]) if union is not None else None,
        union_p_value=union.p_value if union is not None else None,
        combined_p_value=evidence.combined_p,
        earlier=evidence.earlier,
        p_value=evidence.p_value,
        adjusted_p_value=adjusted,
        flagged=flagged,
        reason=reason,
        evidence=evidence.other,
        class_impacts=tuple(float(v) for v in union.last[1:]) if union is not None else (),
    )
