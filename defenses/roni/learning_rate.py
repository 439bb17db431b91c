"""The "auto" learning rate, chosen on the trusted rows alone: the rate of the grid at which stable probe copies
separate draws with a tenth of their labels flipped furthest from clean draws of the same label histograms."""

from __future__ import annotations

import numpy as np
import torch

from trainguard.defenses.conformal import Standardizer
from trainguard.defenses.errors import ScreeningInputError
from trainguard.defenses.heldout import LabeledData
from trainguard.defenses.roni.config import LR_PROBE_DRAWS, PROBE_FLIPS, PROBE_PATIENCE, PROBE_STREAM, ScreeningConfig
from trainguard.defenses.roni.draws import _Draws, bootstrap_draws, stratified_draws
from trainguard.defenses.roni.finetune import _Impacts, _Scoped


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
