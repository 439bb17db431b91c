"""What a screening is asked to do (`ScreeningConfig`: budget, scope, decision rule) and the fixed budgets and
random streams it draws with."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from trainguard.defenses.conformal import Combination, ErrorControl
from trainguard.defenses.errors import ScreeningInputError

LR_GRID = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)
LR_PROBE_DRAWS = 40  # calibration draws that try each rate of the grid ("auto" lr)
PROBE_PATIENCE = 2  # stable rates in a row below the best separation that end the search
PROBE_FLIPS = 0.1  # labels moved in the probe's poisoned draws (classification): at random, or one class to another
SCALE_DRAWS = 50  # draws per size and class set that fit the standardisation, kept apart from the p-value draws
MIN_POOL_ROWS = 10  # trusted rows of a class below which its bootstrap draws stand for fresh rows only roughly
SCALE_STREAM, PROBE_STREAM, DRAW_STREAM = 0, 1, 2  # independent random streams; class c's part of a draw: 3 + c


@dataclass(frozen=True)
class ScreeningConfig:
    """Fine-tuning budget, scope and decision rule of the screening.

    `lr="auto"` tries every rate of `lr_grid` on probe draws of the trusted rows; of the rates at which every probe
    copy stays finite and the median one loses at most `lr_tolerance` of held-out soft accuracy (the mean
    true-class probability), it takes the one at which the same draws with a tenth of their labels flipped stand
    furthest above the clean ones (classification; other tasks: the largest). Only trusted rows choose it, so
    candidates and their calibration draws stay exchangeable. `SCALE_DRAWS` more clean draws per size and class set
    fit each metric's center and scale. The head scope is the default whatever the model's size: full scope trains
    every copy through the whole network (issue #28: a first digits cycle took 41 minutes on two cores).

    Attributes:
        steps: Fine-tuning steps per copy (>= 1).
        checkpoints: How many times the held-out margins are read, halving from `steps` (`marks`: 20 steps, 4
            checkpoints: 3, 5, 10, 20); the statistic takes the worst of them (>= 1).
        lr: The fine-tuning learning rate (> 0), or `"auto"` (see above).
        lr_grid: The rates `"auto"` tries (each > 0).
        lr_tolerance: The held-out soft accuracy a probe copy may lose at an `"auto"` rate, in (0, 1].
        level: With `error_control` "per-candidate", the probability that a clean shard is rejected (its own test
            and its source's test get `level`/2 each where a source test exists); with "bh" / "by", the false
            discovery rate across the cycle's shard and source tests. In (0, 1).
        error_control: `"per-candidate"`, `"bh"` or `"by"`.
        calibration_draws: The most clean draws per label histogram behind the sequential p-values; the smallest
            p-value is 1 / (draws + 1), so `draws + 1 >= 4 / level` is required (a union test must be able to
            reject under the 4-way split).
        sequential_hits: Draws scoring at least the candidate that stop its sequential p-value, in [1,
            `calibration_draws`].
        stratify: Whether each class's share of the candidate is drawn from that class's trusted rows
            (classification only).
        pool_fraction: A stratified candidate is tested on at most this share of the trusted rows of each class it
            holds (a seeded subsample), in (0, 1]; None: whole candidates.
        combination: How a source's shard p-values (earlier cycles' included) merge: `"brown"`, `"simes"`,
            `"fisher"` or `"stouffer"`.
        size_tolerance: Unstratified, and for the scales, sizes within this fraction share the draws of the
            smallest of them (smaller draws vary more: the shared test is, if anything, lenient); in [0, 1).
        trim: The share of each shard's rows (rounded down, at least one, never all) left out of its copy's
            fine-tuning: those the deployed model contradicts most (lowest margin). Calibration draws are trimmed
            alike, so the test stays exchangeable. In [0, 0.5); 0 (the default): none. For contributors of a few
            classes: one atypical clean row (an 8 the model gives probability 0) pushes such a shard past draws from
            a trusted pool too small to hold such rows. It costs power against few-row attacks (README).
        min_scale: The measurable floor, in margin units (>= 0): impacts are compared in steps of it (smaller
            differences tie, against the candidate) and no scale is below it, so a saturated model (clean impacts
            all ~0) does not turn rounding into evidence.
        per_class: Whether the statistic adds one metric per class.
        num_classes: Classification: the number of classes (None: one more than the largest label seen).
        scope: `"full"` fine-tunes every parameter; `"head"` only the last `head_layers` Linear layers (or the
            module named by `feature_layer` and what follows it in its nn.Sequential) on frozen features; `"auto"`
            (the default) is "head" wherever there is one whose output is the model's (an nn.Linear, or
            `feature_layer`, with nothing after it in `forward`) and the model reads its input alone, else "full"
            (no such head, extra inputs or a forward hook).
        feature_layer: The module whose input is the frozen feature, named by its path in the model (a later
            sibling in its nn.Sequential belongs to the head too); None: the last `head_layers` Linear layers.
        head_layers: How many Linear layers the head holds (>= 1).
        chunk_size: How many copies train at once (>= 1; None: measured from memory on CUDA, 128 elsewhere).
        batched: Whether the copies train together; False trains them one after another (same results, for
            comparison).
        seed: Seeds the draws, probes and subsamples (>= 0).

    Raises:
        ScreeningInputError: A value out of the ranges above, or an unknown error control or combination.

    Example::

        from trainguard import ScreeningConfig, screen_candidates

        config = ScreeningConfig(level=0.01, error_control="bh", steps=20, scope="head", seed=1)
        report = screen_candidates(model, trusted, holdout, candidates, config)
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
    trim: float = 0.0
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
        if not 0 <= self.trim < 0.5:
            raise ScreeningInputError("screening config: trim must be in [0, 0.5)")
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

    def trimmed(self, rows: int) -> int:
        """How many of a shard's `rows` its copy leaves out (`trim`): whole shares of `trim`, at least one row,
        never all."""
        return min(max(1, math.floor(self.trim * rows)), rows - 1) if self.trim else 0

    @property
    def marks(self) -> tuple[int, ...]:
        """The steps after which each copy's held-out margins are read: `checkpoints` of them, halving from `steps`
        (20 steps, 4 checkpoints: 3, 5, 10, 20)."""
        return tuple(sorted({math.ceil(self.steps / 2**k) for k in range(self.checkpoints)}))
