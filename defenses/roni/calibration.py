"""The calibration of one model, trusted set and held-out set (`Calibration`): the learning rate, each size and
class set's standardisation (fitted on separate clean draws) and the strata of clean draws the p-values count, reused
by the next screening of the same three."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from trainguard.defenses.conformal import Standardizer
from trainguard.defenses.errors import ScreeningInputError
from trainguard.defenses.heldout import LabeledData
from trainguard.defenses.roni.config import SCALE_DRAWS, SCALE_STREAM, ScreeningConfig
from trainguard.defenses.roni.draws import _Draws, bootstrap_draws
from trainguard.defenses.roni.finetune import _Impacts, _Scoped
from trainguard.defenses.roni.learning_rate import _learning_rate


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
    rate the "auto" probe tried with its poisoned draws' separation (None: unstable, or not measured).

    Attributes:
        lr: The learning rate the copies fine-tune at.
        chunk_size: How many copies train at once (None: not fixed).
        scope: `"full"` or `"head"`: what the copies fine-tune.
        scales: The standardisation of each candidate size and class set, fitted on separate clean draws.
        strata: The clean draws of each label histogram (or size) and their statistics, in the order drawn.
        probed: Each rate the "auto" probe tried, with its poisoned draws' separation.
    """

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
