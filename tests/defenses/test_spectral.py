"""Spectral signatures find a BadNets backdoor's rows and its source, and leave clean digits alone."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainguard.defenses.errors import DetectionInputError
from trainguard.defenses.spectral import SpectralConfig, detect_spectral, spectral_scores

REFERENCE = "<reference>"


def test_a_shifted_minority_scores_highest_on_the_top_singular_vector() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 16))
    features[:20] += 8.0 * np.eye(16)[3]
    scores = spectral_scores(features, np.zeros(200, dtype=np.int64))
    assert set(np.argsort(-scores)[:20]) == set(range(20))


def test_backdoor_rows_are_flagged_and_only_their_source_is(backdoored_digits) -> None:
    s = backdoored_digits
    found = detect_spectral(s.features, s.labels, s.sources)
    assert s.rate(found.flagged_rows, poisoned=True) >= 0.8
    assert s.rate(found.flagged_rows, poisoned=False) <= 0.02
    assert found.flagged_sources == ("mallory",)
    mallory = next(f for f in found.sources if f.source == "mallory")
    assert mallory.q_value <= 0.01 and mallory.fraction > found.clean_rate
    assert all(r.source != REFERENCE for r in found.rows) and len(found.rows) == int((s.sources != REFERENCE).sum())


def test_clean_digits_flag_few_rows_and_no_source(clean_digits) -> None:
    s = clean_digits
    found = detect_spectral(s.features, s.labels, s.sources)
    assert s.rate(found.flagged_rows, poisoned=False) <= 0.02
    assert found.flagged_sources == ()


def test_the_papers_rule_removes_the_top_one_and_a_half_eps_of_each_class(backdoored_digits) -> None:
    s = backdoored_digits
    config = SpectralConfig(rule="fraction", expected_fraction=0.1)
    found = detect_spectral(s.features, s.labels, s.sources, config)
    assert s.rate(found.flagged_rows, poisoned=True) >= 0.8
    flagged = set(found.flagged_rows)
    for label in range(10):
        members = np.flatnonzero(s.labels == label)
        candidates = [i for i in members if s.sources[i] != REFERENCE]
        assert sum(i in flagged for i in candidates) <= math.ceil(0.15 * len(members))


def test_inputs_without_reference_rows_are_refused(backdoored_digits) -> None:
    s = backdoored_digits
    with pytest.raises(DetectionInputError, match="reference"):
        detect_spectral(s.features, s.labels, np.where(s.sources == REFERENCE, "alice", s.sources))
    with pytest.raises(DetectionInputError, match="rule"):
        SpectralConfig(rule="top")
