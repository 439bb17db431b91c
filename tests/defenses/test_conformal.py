"""The statistics behind RONI's decisions: conformal p-values hold their level on clean data, the one statistic
spends one budget on all metrics, BH/BY and the combinations match their textbook values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from trainguard.defenses.conformal import (
    Combination,
    Standardizer,
    bonferroni_min,
    brown,
    combined,
    conformal_p_values,
    fisher,
    rejected,
    sequential_p_value,
    simes,
    step_up_adjusted,
    stouffer,
)
from trainguard.defenses.errors import ScreeningInputError


def test_conformal_p_value_counts_calibration_scores_at_least_as_large() -> None:
    calibration = [1.0, 2.0, 3.0, 4.0]
    assert conformal_p_values(calibration, [0.0, 2.0, 2.5, 4.0, 9.0, math.nan]).tolist() == pytest.approx(
        [1.0, 4 / 5, 3 / 5, 2 / 5, 1 / 5, 1 / 5]
    )


@given(
    st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=60),
    st.floats(-1e6, 1e6),
    st.floats(-1e6, 1e6),
)
def test_p_values_lie_in_their_range_and_fall_as_the_score_grows(calibration: list[float], a: float, b: float) -> None:
    low, high = sorted((a, b))
    p_low, p_high = conformal_p_values(calibration, [low, high])
    assert 1 / (len(calibration) + 1) <= p_high <= p_low <= 1


def test_sequential_p_value_stops_at_the_hits_th_draw_at_least_the_score() -> None:
    assert sequential_p_value([5.0, 1.0, 7.0, 3.0, 9.0], 4.0, hits=2, limit=5) == pytest.approx(2 / 3)
    assert sequential_p_value([1.0, 2.0], 4.0, hits=2, limit=5) is None  # undecided: draw more
    assert sequential_p_value([1.0, 2.0, 3.0, 5.0, 1.0], 4.0, hits=2, limit=5) == pytest.approx(2 / 6)
    assert sequential_p_value([1.0, 2.0, 3.0, 5.0, 1.0, 9.0], math.nan, hits=2, limit=5) == pytest.approx(1 / 6)
    assert sequential_p_value([4.0, 4.0], 4.0, hits=2, limit=5) == 1.0  # ties count against the candidate
    with pytest.raises(ScreeningInputError):
        sequential_p_value([1.0], 0.0, hits=0, limit=5)


@pytest.mark.parametrize("ties", [False, True])
def test_sequential_p_values_of_exchangeable_scores_are_super_uniform(ties: bool) -> None:
    """Candidate and draws from one distribution (continuous, or coarse with many ties): P(p <= a) <= a at every a,
    and close to a where a is a value the p-value takes (the test is not vacuously conservative)."""
    rng = np.random.default_rng(0)
    trials, hits, limit = 20_000, 5, 99
    draws = rng.random((trials, limit))
    scores = rng.random(trials)
    if ties:
        draws, scores = np.floor(draws * 8), np.floor(scores * 8)
    p = np.array([sequential_p_value(d, s, hits, limit) for d, s in zip(draws, scores, strict=True)])
    for a in (0.01, 0.02, 0.05, 0.1, 0.25, 0.5):
        assert np.mean(p <= a) <= a + 3 * math.sqrt(a * (1 - a) / trials)
    if not ties:
        assert np.mean(p <= 0.05) >= 0.05 - 3 * math.sqrt(0.05 * 0.95 / trials)
    consulted = np.where(p > hits / (limit + 1), hits / p, limit)  # draws scored before it stopped
    assert consulted.mean() < 0.3 * limit  # a clean candidate stops early


@given(st.lists(st.floats(-1e6, 1e6), min_size=20, max_size=20), st.floats(-1e6, 1e6), st.floats(-1e6, 1e6))
def test_sequential_p_values_lie_in_their_range_and_fall_as_the_score_grows(
    calibration: list[float], a: float, b: float
) -> None:
    low, high = sorted((a, b))
    p_low, p_high = (sequential_p_value(calibration, s, hits=3, limit=20) for s in (low, high))
    assert p_low is not None and p_high is not None
    assert 1 / 21 <= p_high <= p_low <= 1


@pytest.mark.parametrize("tail", ["normal", "heavy"])
def test_clean_candidates_are_rejected_at_most_at_the_level(tail: str) -> None:
    """Many screenings of clean candidates: metrics exchangeable with the calibration draws (Gaussian, or heavy
    Student-t tails with one noisy metric), a standardizer fitted on separate draws, the statistic's conformal
    p-value; the share rejected stays at the level (up to Monte Carlo slack)."""
    rng = np.random.default_rng(0)
    level, draws, trials = 0.05, 99, 400

    def impacts(n: int) -> np.ndarray:
        noise = rng.standard_normal((n, 11)) if tail == "normal" else rng.standard_t(2, (n, 11))
        return noise * np.array([1.0, *[0.2] * 9, 3.0])

    rejections = []
    for _ in range(trials):
        standardizer = Standardizer.fit(impacts(50), floor=1e-3, width=11)
        calibration = standardizer.score(impacts(draws))
        p = conformal_p_values(calibration, standardizer.score(impacts(20)))
        rejections.append(p <= level)
    rate = float(np.mean(rejections))
    assert rate <= level + 0.01
    assert rate >= level - 0.02  # and is not vacuously conservative


def test_a_shift_in_one_metric_of_eleven_is_found_through_the_statistic() -> None:
    rng = np.random.default_rng(1)
    clean = rng.standard_normal((600, 11))
    standardizer = Standardizer.fit(clean[:50], floor=1e-3)
    shifted = rng.standard_normal((20, 11))
    shifted[:, 4] += 6.0  # one class's margin dropped, the others did not
    p = conformal_p_values(standardizer.score(clean[50:]), standardizer.score(shifted))
    assert (p <= 0.01).mean() >= 0.9


def test_absent_metrics_are_left_out_and_a_diverged_one_scores_infinite() -> None:
    clean = np.column_stack([np.linspace(0, 1, 20), np.full(20, np.nan)])
    standardizer = Standardizer.fit(clean, floor=1e-3)
    assert standardizer.scale[1] == math.inf
    scores = standardizer.score(np.array([[0.5, np.nan], [np.nan, np.nan], [np.inf, np.nan]]))
    assert math.isfinite(scores[0]) and scores[1] == math.inf and scores[2] == math.inf


def test_shared_scale_is_the_median_of_the_pooled_metrics() -> None:
    values = np.column_stack([np.arange(9.0), np.arange(9.0) * 0.01, np.arange(9.0), np.arange(9.0) * 100])
    standardizer = Standardizer.fit(values, floor=0.0, width=4)
    own = Standardizer.fit(values, floor=0.0)
    assert standardizer.scale[0] == own.scale[0]
    assert standardizer.scale[1:] == (own.scale[2],) * 3


def test_classes_share_a_scale_within_each_checkpoint_only() -> None:
    early, late = np.column_stack([np.arange(9.0)] * 3), np.column_stack([np.arange(9.0) * 10] * 3)
    standardizer = Standardizer.fit(np.hstack([early, late]), floor=0.0, width=3)
    assert standardizer.scale[1:3] == (standardizer.scale[0],) * 2
    assert standardizer.scale[4:6] == (standardizer.scale[3],) * 2 == (10 * standardizer.scale[0],) * 2


def test_several_classes_pushed_some_way_score_like_one_pushed_far() -> None:
    standardizer = Standardizer((0.0,) * 5, (1.0,) * 5, width=5)
    one_far, four_some, pulled_up = [[0, 4, 0, 0, 0]], [[0, 2, 2, 2, 2]], [[0, -9, -9, -9, 0]]
    assert standardizer.score(np.array(four_some))[0] == pytest.approx(standardizer.score(np.array(one_far))[0])
    assert standardizer.score(np.array(pulled_up))[0] == 0.0  # only pushes down count


def test_the_worst_checkpoint_decides_the_score() -> None:
    standardizer = Standardizer((0.0,) * 4, (1.0,) * 4, width=2)
    assert standardizer.score(np.array([[3.0, 0, 0, 0], [0, 0, 0, 5.0]])).tolist() == [3.0, 5.0]


def test_impacts_below_the_measurable_floor_tie_and_count_against_the_candidate() -> None:
    """A saturated model: clean impacts and a candidate's differ only by rounding; the candidate is not rejected."""
    rng = np.random.default_rng(2)
    clean = rng.normal(0.0, 1e-7, (400, 3))
    candidate = np.full((1, 3), 5e-7)  # 5 'clean scales' above, all below the floor
    exact = Standardizer.fit(clean[:50], floor=0.0, width=3)
    floored = Standardizer.fit(clean[:50], floor=1e-3, width=3)
    assert conformal_p_values(exact.score(clean[50:]), exact.score(candidate))[0] < 0.01
    assert conformal_p_values(floored.score(clean[50:]), floored.score(candidate))[0] == 1.0


def test_benjamini_hochberg_and_yekutieli_match_known_adjusted_values() -> None:
    p = [0.01, 0.04, 0.03, 0.005, 0.5]
    assert step_up_adjusted(p, "bh") == pytest.approx([0.025, 0.05, 0.05, 0.025, 0.5])
    harmonic = 1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5
    assert step_up_adjusted(p, "by") == pytest.approx(
        np.minimum(1, np.array([0.025, 0.05, 0.05, 0.025, 0.5]) * harmonic)
    )
    assert rejected(p, 0.05, "bh").tolist() == [True, True, True, True, False]
    assert rejected(p, 0.04, "bh").tolist() == [True, False, False, True, False]
    assert rejected(p, 0.03, "per-candidate").tolist() == [True, False, True, True, False]
    with pytest.raises(ScreeningInputError):
        rejected(p, 0.05, "holm")  # type: ignore[arg-type]


@given(st.lists(st.floats(1e-12, 1.0), min_size=1, max_size=40), st.floats(1e-4, 0.5))
def test_bh_rejects_exactly_the_step_up_set(p: list[float], level: float) -> None:
    """BH rejects the k smallest p-values, k the largest index with p_(k) <= level * k / m."""
    ordered = np.sort(p)
    m = len(p)
    thresholds = level * np.arange(1, m + 1) / m
    assume(np.all(np.abs(ordered - thresholds) > 1e-9 * thresholds))  # ties with a threshold: rounding decides
    passing = [k for k in range(1, m + 1) if ordered[k - 1] <= thresholds[k - 1]]
    k = max(passing, default=0)
    decided = rejected(p, level, "bh")
    assert decided.sum() == k
    if k:
        assert np.asarray(p)[decided].max() <= ordered[k - 1]


def test_brown_is_fisher_without_correlation_and_weaker_with_it() -> None:
    p = [0.04, 0.01, 0.5, 0.2]
    assert brown(p, 0.0) == pytest.approx(fisher(p), rel=1e-12)
    assert fisher(p) < brown(p, 0.1) < brown(p, 0.5) < 1
    assert brown([0.3], 0.4) == pytest.approx(0.3, rel=1e-9)  # one test: its own p-value
    with pytest.raises(ScreeningInputError):
        brown(p, 1.0)


def test_simes_matches_its_definition() -> None:
    assert simes([0.04, 0.01, 0.5]) == pytest.approx(0.03)  # min(3 * 0.01 / 1, 3 * 0.04 / 2, 3 * 0.5 / 3)
    assert simes([0.02, 0.02, 0.02]) == pytest.approx(0.02)
    assert combined([0.5], "simes") == pytest.approx(0.5)
    with pytest.raises(ScreeningInputError):
        simes([1.5])


def test_fisher_and_stouffer_match_reference_values() -> None:
    assert fisher([0.05, 0.05, 0.05]) == pytest.approx(0.006296506270915, rel=1e-9)
    assert stouffer([0.05, 0.05, 0.05]) == pytest.approx(0.002193050439056868, rel=1e-6)
    assert fisher([0.5]) == pytest.approx(0.5) and stouffer([0.5]) == pytest.approx(0.5)
    assert 0 < fisher([1e-10] * 30) < 1e-200  # no underflow to 0, no overflow
    assert combined([0.9, 0.01, 0.3], "fisher") == pytest.approx(0.06589398429103, rel=1e-9)
    assert bonferroni_min([0.2, 0.01, 0.5]) == pytest.approx(0.03)
    with pytest.raises(ScreeningInputError):
        fisher([0.0])


@pytest.mark.parametrize("method", ["brown", "simes", "fisher", "stouffer"])
def test_combined_p_values_of_clean_sources_hold_the_level(method: str) -> None:
    rng = np.random.default_rng(2)
    combined_p = [combined(rng.uniform(size=8), method) for _ in range(4000)]  # type: ignore[arg-type]
    assert np.mean(np.array(combined_p) <= 0.05) <= 0.06


def test_brown_and_simes_hold_the_level_for_a_many_shard_source_where_fisher_does_not() -> None:
    """A source's shards are all judged against draws from one finite trusted pool: where the pool happens to move
    the model less than fresh rows do, every shard's p-value is a little low at once. Fisher multiplies that into
    rejections of clean sources at three times the level; Brown's method with the correlation the design implies
    (shards of 5 rows, a pool of 40: 5 / 45) and Simes' stay near it, and Brown's keeps more power than Simes'."""
    rng = np.random.default_rng(0)
    methods: tuple[Combination, ...] = ("brown", "simes", "fisher")
    clean, shifted = dict.fromkeys(methods, 0), dict.fromkeys(methods, 0)
    for _ in range(1000):
        pool = rng.normal(size=40)  # row effects of the trusted rows; calibration draws resample them
        calibration = pool[rng.integers(0, 40, size=(199, 5))].mean(axis=1)
        fresh = rng.normal(size=(18, 5)).mean(axis=1)  # 18 shards of 5 fresh rows each
        p, harmful = conformal_p_values(calibration, fresh), conformal_p_values(calibration, fresh + 0.25)
        for method in methods:
            clean[method] += combined(p, method, 5 / 45) <= 0.05
            shifted[method] += combined(harmful, method, 5 / 45) <= 0.05
    assert clean["fisher"] >= 120
    assert clean["brown"] <= 75 and clean["simes"] <= 60
    assert shifted["brown"] >= 1.5 * shifted["simes"]


def test_many_slightly_small_p_values_combine_into_a_small_one() -> None:
    """Dilution: 15 shards each at p = 0.1 pass one by one, their source does not."""
    assert fisher([0.1] * 15) < 1e-4
    assert stouffer([0.1] * 15) < 1e-5
