"""The sequential p-values (Besag & Clifford 1991): each candidate against the clean draws of its stratum, drawn in
stages until every candidate is decided."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import cast

import numpy as np

from trainguard.defenses.conformal import sequential_p_value
from trainguard.defenses.errors import ScreeningInputError
from trainguard.defenses.roni.calibration import Calibration, Stratum, _clean_impacts, _Key
from trainguard.defenses.roni.config import DRAW_STREAM, ScreeningConfig
from trainguard.defenses.roni.draws import bootstrap_draws, stratified_draws
from trainguard.defenses.roni.finetune import _Impacts, _Scoped


def _stratum_match(
    strata: Sequence[Stratum], size: int, counts: tuple[int, ...] | None, tolerance: float
) -> int | None:
    """Index of the stratum of exactly these `counts`; unstratified, of the largest size <= `size` within
    `tolerance` of it (smaller draws vary more: a lenient match)."""
    if counts is not None:
        return next((i for i, s in enumerate(strata) if s.counts == counts), None)
    fits = [i for i, s in enumerate(strata) if s.counts is None and size * (1 - tolerance) <= s.size <= size]
    return max(fits, key=lambda i: strata[i].size, default=None)


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
