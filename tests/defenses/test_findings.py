"""A source's flagged rows are held to the clean rates of its own classes: a clean source of hard classes only is not
flagged, and one with many more flags than its classes explain is."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
from scipy.stats import binomtest

from trainguard.defenses.findings import clean_flag_tail, findings

REFERENCE = "<reference>"
RATES = np.array([0.12, 0.12, *[0.01] * 8])  # the detector flags clean rows of classes 0 and 1 far more often


def _rows(rng: np.random.Generator, labels: np.ndarray, extra: float = 0.0) -> np.ndarray:
    return rng.random(len(labels)) < RATES[labels] + extra


def test_clean_sources_of_hard_classes_only_are_not_flagged() -> None:
    rng = np.random.default_rng(0)
    reference = np.repeat(np.arange(10), 60)
    sources = 200
    hard = np.tile(np.repeat([0, 1], 40), sources)  # each source: 40 rows of class 0 and 40 of class 1
    labels = np.concatenate([reference, hard])
    flagged = np.concatenate([_rows(rng, reference), _rows(rng, hard)])
    names = [REFERENCE] * len(reference) + [f"clinic{i // 80}" for i in range(len(hard))]
    is_reference = np.arange(len(labels)) < len(reference)
    found = findings("label-issues", np.zeros(len(labels)), flagged, labels, names, is_reference, alpha=0.01)
    assert found.flagged_sources == ()
    assert np.mean([s.p_value <= 0.01 for s in found.sources]) <= 0.02
    pooled = (flagged[is_reference].sum() + 1) / (len(reference) + 2)  # the rate of all classes together
    assert (
        np.mean(
            [binomtest(s.flagged_rows, s.rows, pooled, alternative="greater").pvalue <= 0.01 for s in found.sources]
        )
        > 0.5
    )
    assert all(s.expected > pooled * s.rows for s in found.sources)


def test_a_source_with_more_flags_than_its_classes_explain_is_flagged() -> None:
    rng = np.random.default_rng(1)
    reference = np.repeat(np.arange(10), 60)
    labels = np.concatenate([reference, np.repeat([0, 1], 40), np.repeat([0, 1], 40)])
    flagged = np.concatenate([_rows(rng, reference), _rows(rng, labels[600:680]), _rows(rng, labels[680:], 0.25)])
    names = [REFERENCE] * 600 + ["clinic"] * 80 + ["mallory"] * 80
    found = findings("label-issues", np.zeros(len(labels)), flagged, labels, names, np.arange(760) < 600, alpha=0.01)
    assert found.flagged_sources == ("mallory",)


def test_the_flag_tail_is_the_exact_convolution_of_the_classes_predictives() -> None:
    """Without reference flags in a class the predictive is wide, not zero; the tail at 0 flags is 1 and falls
    with every flag."""
    reference = np.repeat(np.arange(3), 50)
    reference_flags = np.zeros(150, dtype=bool)
    reference_flags[:5] = True  # 5 of class 0's 50
    source = np.array([0] * 20 + [2] * 20)
    tails = [clean_flag_tail(source, k, reference, reference_flags)[0] for k in range(6)]
    assert tails[0] == 1.0 and all(a > b for a, b in pairwise(tails))
    assert tails[1] < 1.0 and tails[5] > 1e-4  # class 2's rate is uncertain, not 0
    _, expected = clean_flag_tail(source, 0, reference, reference_flags)
    pooled = (5 + 1) / (150 + 2)
    assert abs(expected - (20 * 6 + 20 * 1) / (1 / pooled + 50)) < 1e-9  # posterior means: (1 + k) / (1/r + n)
