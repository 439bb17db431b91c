"""The statistics of RONI's decisions: conformal p-values, a max-statistic over metrics, combined p-values and
multiple-testing control. Pure functions on arrays (no torch), so each property can be tested on its own.

- Conformal p-value (Vovk et al. 2005; Bates et al. 2023, "Testing for outliers with conformal p-values"): with n
  calibration scores exchangeable with a clean candidate's score, p = (1 + #{calibration >= score}) / (n + 1)
  satisfies P(p <= a) <= a for every a: a clean candidate is rejected at level a at most a of the time.
- Sequential Monte-Carlo p-value (Besag & Clifford 1991, "Sequential Monte Carlo p-values"): clean draws are scored
  one after another and the count stops once `hits` of them score at least the candidate, at draw l: p = hits / l;
  if `limit` draws pass with g < hits such draws, p = (g + 1) / (limit + 1). Equally valid, and a clearly clean
  candidate costs about hits / p draws instead of `limit`.
- One statistic from many metrics: the overall impact and one per class, at several checkpoints, are standardised by
  a center and scale fitted on separate draws and reduced to one score (the largest over checkpoints of the norm of
  the positive parts); the score is calibrated like any score, so the per-class and per-checkpoint readings spend
  the same error budget as one metric would instead of adding their own (Westfall & Young 1993).
- Combinations merge the p-values of one source's tests into one. Its shards share the trusted sample their
  calibration draws come from: a shard of n rows differs from that sample by its own noise (~1/n) and the sample's
  (~1/N, shared by every shard), so their statistics correlate at about n / (n + N). Fisher's method assumes
  independence and on digits flagged a clean source of 18 shards at p = 1e-5 (1 split in 20: that split's trusted
  rows moved the model a little less than the pool did, so all 18 p-values were a little low). Brown's method (1975;
  Kost & McDermott 2002) is Fisher's statistic referred to a scaled chi-square with that correlation: it keeps most
  of Fisher's power against poison spread thinly over many shards. Simes' (valid under any positive dependence) and
  Fisher's and Stouffer's as they are, on request.
- Benjamini-Hochberg (1995) and Benjamini-Yekutieli (2001) step-up procedures control the false discovery rate;
  BH is valid for conformal p-values sharing one calibration set (Bates et al. 2023: they are PRDS).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from trainguard.defenses.errors import ScreeningInputError

MAD_TO_SIGMA = 1.4826  # makes the MAD a consistent estimate of a normal standard deviation
Combination = Literal["brown", "simes", "fisher", "stouffer"]
ErrorControl = Literal["per-candidate", "bh", "by"]


def conformal_p_values(calibration: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """p = (1 + #{calibration >= score}) / (n + 1) per score; a NaN score counts as +inf (the most extreme).

    Valid when a clean score is exchangeable with the calibration scores: P(p <= a) <= a for every level a.

    Args:
        calibration: Scores of clean draws (finite, at least one).
        scores: The scores to test; larger is more extreme.

    Returns:
        One p-value per score, in (0, 1].

    Raises:
        ScreeningInputError: No calibration scores, or a non-finite one.
    """
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    if cal.size == 0 or not np.isfinite(cal).all():
        raise ScreeningInputError("conformal p-values need at least one calibration score, all finite")
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=math.inf)
    at_least = cal.size - np.searchsorted(cal, s, side="left")
    return (1.0 + at_least) / (cal.size + 1.0)


def sequential_p_value(calibration: Sequence[float] | np.ndarray, score: float, hits: int, limit: int) -> float | None:
    """Besag & Clifford's p-value of `score` against clean scores in the order they were drawn (only the first
    `limit` count), or None while undecided (fewer than `limit` draws and fewer than `hits` at least the score). A
    NaN score counts as +inf."""
    if hits < 1 or limit < hits:
        raise ScreeningInputError(f"a sequential p-value needs 1 <= hits <= limit, got hits={hits}, limit={limit}")
    cal = np.asarray(calibration, dtype=np.float64)[:limit]
    if not np.isfinite(cal).all():
        raise ScreeningInputError("sequential p-values need finite calibration scores")
    at_least = np.cumsum(cal >= (math.inf if math.isnan(score) else score))
    reached = np.flatnonzero(at_least >= hits)
    if reached.size:
        return hits / float(reached[0] + 1)
    if cal.size == limit:
        return (float(at_least[-1]) + 1.0) / (limit + 1.0)
    return None


@dataclass(frozen=True)
class Standardizer:
    """Per-metric center (median) and scale (1.4826 * MAD, at least `floor`) of clean impacts, in blocks of `width`
    metrics (one block per checkpoint: the overall impact, then one per class). `score` is, for each row, the largest
    over blocks of the Euclidean norm of the block's positive standardised impacts: one class pushed far and several
    pushed some way both count, and a push that shows early or late in fine-tuning both count. Impacts are compared
    in steps of `floor` (the measurable floor): smaller differences are ties, which count against the candidate. A
    metric NaN in every clean draw (a class absent from the held-out set) is left out; NaN or infinite where the
    clean draws had it (a diverged copy) scores +inf."""

    center: tuple[float, ...]
    scale: tuple[float, ...]
    width: int = 1
    floor: float = 0.0

    @classmethod
    def fit(cls, values: np.ndarray, floor: float, width: int = 1) -> Standardizer:
        """From clean impacts (draws x metrics, in blocks of `width`); a metric that is NaN in every draw gets an
        infinite scale. Within a block, metrics after the first share one scale, the median of theirs (per-class
        metrics: a class whose clean impacts barely vary would otherwise turn any small change into a huge
        standardised one)."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[0] == 0 or width < 1 or values.shape[1] % width:
            raise ScreeningInputError("a standardizer needs a non-empty (draws x metrics) array in whole blocks")
        values = _quantized(values, floor)
        centers, scales = [], []
        for column in values.T:
            column = column[~np.isnan(column)]
            if column.size == 0:
                centers.append(0.0)
                scales.append(math.inf)
                continue
            median = float(np.median(column))
            centers.append(median)
            scales.append(max(MAD_TO_SIGMA * float(np.median(np.abs(column - median))), floor) or 1e-12)
        for start in range(0, len(scales), width):
            block = scales[start + 1 : start + width]
            finite = [v for v in block if math.isfinite(v)]
            shared = float(np.median(finite)) if finite else math.inf
            scales[start + 1 : start + width] = [shared if math.isfinite(v) else v for v in block]
        return cls(tuple(centers), tuple(scales), width, floor)

    def standardized(self, values: np.ndarray) -> np.ndarray:
        """(rows x metrics) in units of each metric's scale above its center; NaN stays NaN."""
        return np.asarray(
            (_quantized(np.asarray(values, dtype=np.float64), self.floor) - np.asarray(self.center))
            / np.asarray(self.scale)
        )

    def score(self, values: np.ndarray) -> np.ndarray:
        """The statistic of each row; +inf where any present metric is non-finite (fails closed)."""
        z = self.standardized(values)
        broken = (np.isinf(z) | (np.isnan(z) & np.isfinite(self.scale))).any(1)
        pushed = np.where(np.isnan(z), 0.0, np.clip(z, 0.0, None))
        blocks = np.sqrt(np.square(pushed).reshape(len(z), -1, self.width).sum(-1))
        return np.where(broken, math.inf, blocks.max(1))


def _quantized(values: np.ndarray, step: float) -> np.ndarray:
    """`values` rounded to multiples of `step` (unchanged for step 0); NaN and infinities stay."""
    if step <= 0:
        return values
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(values), np.round(values / step) * step, values)


def simes(p_values: Sequence[float]) -> float:
    """Simes' combination: min over i of k p_(i) / i, the smallest Benjamini-Hochberg adjusted p-value (through
    `scipy.stats.false_discovery_control`); valid for p-values that depend positively, as one source's shards do."""
    return float(step_up_adjusted(_checked(p_values), "bh").min())


def brown(p_values: Sequence[float], correlation: float) -> float:
    """Brown's combination: Fisher's statistic X = -2 sum log p over a scaled chi-square with X's mean and variance
    when every pair of tests correlates at `correlation` (the covariance of -2 log p from Kost & McDermott 2002);
    Fisher's exactly at correlation 0."""
    from scipy.stats import chi2

    if not 0 <= correlation < 1:
        raise ScreeningInputError(f"Brown's combination needs a correlation in [0, 1), got {correlation}")
    p = _checked(p_values)
    k = p.size
    covariance = 3.263 * correlation + 0.710 * correlation**2 + 0.027 * correlation**3
    mean, variance = 2.0 * k, 4.0 * k + k * (k - 1) * covariance
    scale, dof = variance / (2 * mean), 2 * mean**2 / variance
    return float(min(1.0, chi2.sf(-2.0 * np.log(p).sum() / scale, dof)))


def fisher(p_values: Sequence[float]) -> float:
    """Fisher's combination: P(chi2 with 2k dof >= -2 sum log p), through `scipy.stats.combine_pvalues`."""
    from scipy.stats import combine_pvalues

    return float(min(1.0, combine_pvalues(_checked(p_values), method="fisher").pvalue))


def stouffer(p_values: Sequence[float]) -> float:
    """Stouffer's combination: 1 - Phi(sum of Phi^-1(1 - p) / sqrt(k)), through `scipy.stats.combine_pvalues`; a
    p-value of 1 counts as 1 - 1e-16 (not as infinite evidence of a clean source) and the result stays >= 1e-300."""
    from scipy.stats import combine_pvalues

    p = np.clip(_checked(p_values), 1e-300, 1 - 1e-16)
    return max(float(combine_pvalues(p, method="stouffer").pvalue), 1e-300)


def combined(p_values: Sequence[float], method: Combination, correlation: float = 0.0) -> float:
    """One p-value for several tests of the same hypothesis (e.g. every shard of one source is clean); `correlation`
    is what Brown's method assumes between any two of them.

    Args:
        p_values: The tests' p-values, each in (0, 1].
        method: `"brown"`, `"simes"`, `"fisher"` or `"stouffer"` (see the module docstring).
        correlation: Brown's method only: the correlation between any two tests, in [0, 1).

    Returns:
        The combined p-value.

    Raises:
        ScreeningInputError: An unknown method, no p-values or one outside (0, 1], or a correlation outside
            [0, 1) for Brown's.
    """
    if method == "brown":
        return brown(p_values, correlation)
    if method == "simes":
        return simes(p_values)
    if method == "fisher":
        return fisher(p_values)
    if method == "stouffer":
        return stouffer(p_values)
    raise ScreeningInputError(f"unknown combination {method!r}: 'brown', 'simes', 'fisher' or 'stouffer'")


def _checked(p_values: Sequence[float]) -> np.ndarray:
    p = np.asarray(p_values, dtype=np.float64)
    if p.size == 0 or not ((p > 0) & (p <= 1)).all():
        raise ScreeningInputError("combining p-values needs at least one, each in (0, 1]")
    return p


def bonferroni_min(p_values: Sequence[float]) -> float:
    """min(1, k * min p): one p-value for 'any of these k tests' without assuming how they depend."""
    p = _checked(p_values)
    return float(min(1.0, len(p) * p.min()))


def step_up_adjusted(p_values: Sequence[float] | np.ndarray, procedure: Literal["bh", "by"]) -> np.ndarray:
    """BH (or BY) adjusted p-values, through `scipy.stats.false_discovery_control`: a test is rejected at FDR level
    q exactly when its adjusted p-value <= q."""
    from scipy.stats import false_discovery_control

    p = np.asarray(p_values, dtype=np.float64)
    return false_discovery_control(p, method=procedure) if p.size else p


def rejected(p_values: Sequence[float], level: float, control: ErrorControl) -> np.ndarray:
    """Which tests are rejected: each at `level` ("per-candidate": every clean one is falsely rejected with
    probability <= level), or BH / BY across all of them (false discovery rate <= level).

    Args:
        p_values: The tests' p-values.
        level: The per-test error rate, or the false discovery rate for `"bh"` / `"by"`.
        control: `"per-candidate"`, `"bh"` (Benjamini-Hochberg) or `"by"` (Benjamini-Yekutieli).

    Returns:
        A boolean array, True where the test is rejected.

    Raises:
        ScreeningInputError: An unknown error control.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if control == "per-candidate":
        return p <= level
    if control in ("bh", "by"):
        return step_up_adjusted(p, control) <= level
    raise ScreeningInputError(f"unknown error control {control!r}: 'per-candidate', 'bh' or 'by'")
