"""Activation clustering splits a BadNets backdoor off its target class, and leaves clean classes alone."""

from __future__ import annotations

import numpy as np
import pytest

from trainguard.defenses.clustering import ClusteringConfig, detect_clustering
from trainguard.defenses.errors import DetectionInputError

REFERENCE = "<reference>"


def test_the_backdoor_cluster_is_flagged_and_only_its_source_is(backdoored_digits) -> None:
    s = backdoored_digits
    found = detect_clustering(s.features, s.labels, s.sources)
    assert s.rate(found.flagged_rows, poisoned=True) >= 0.8
    assert s.rate(found.flagged_rows, poisoned=False) <= 0.02
    assert found.flagged_sources == ("mallory",)


def test_clean_digits_flag_no_cluster_and_no_source(clean_digits) -> None:
    s = clean_digits
    found = detect_clustering(s.features, s.labels, s.sources)
    assert s.rate(found.flagged_rows, poisoned=False) <= 0.02
    assert found.flagged_sources == ()


def _two_blobs(reference_in_small: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One class of 200 rows: 160 around the origin, 40 far off; 40 reference rows, `reference_in_small` of them
    in the small blob."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 12))
    features[160:] += 8.0
    sources = np.array(["alice"] * 200, dtype=object)
    sources[: 40 - reference_in_small] = REFERENCE
    sources[160 : 160 + reference_in_small] = REFERENCE
    return features, np.zeros(200, dtype=np.int64), sources


def test_a_small_distinct_cluster_is_poison_only_when_the_reference_rows_avoid_it() -> None:
    features, labels, sources = _two_blobs(reference_in_small=0)
    assert len(detect_clustering(features, labels, sources).flagged_rows) == 40
    features, labels, sources = _two_blobs(reference_in_small=8)  # the small blob's share: a clean writing style
    assert detect_clustering(features, labels, sources).flagged_rows == ()
    paper_only = ClusteringConfig(max_reference_ratio=None)
    assert len(detect_clustering(features, labels, sources, paper_only).flagged_rows) == 32


def _shared_cluster(small_blob: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One class: 40 reference rows and 300 of `big`, 60 of `other` in the main blob; plus a distinct small blob
    with no reference row, `small_blob` rows per source."""
    rng = np.random.default_rng(1)
    main = ["<reference>"] * 40 + ["big"] * 300 + ["other"] * 60
    off = [source for source, count in small_blob.items() for _ in range(count)]
    features = rng.normal(size=(len(main) + len(off), 12))
    features[len(main) :] += 8.0
    return features, np.zeros(len(features), dtype=np.int64), np.array(main + off, dtype=object)


def test_a_source_filling_a_flagged_cluster_in_proportion_to_its_rows_is_not_flagged() -> None:
    features, labels, sources = _shared_cluster({"big": 50, "other": 10})
    found = detect_clustering(features, labels, sources)
    assert len(found.flagged_rows) == 60  # the rows are still flagged (and quarantined by the cycle)
    big = next(f for f in found.sources if f.source == "big")
    assert big.flagged_rows == 50 and not big.flagged and found.flagged_sources == ()


def test_a_source_concentrated_in_a_flagged_cluster_is_flagged() -> None:
    features, labels, sources = _shared_cluster({"mallory": 40, "big": 2})
    found = detect_clustering(features, labels, sources)
    assert found.flagged_sources == ("mallory",)


def test_ica_reduction_as_in_the_paper_splits_off_the_distinct_cluster_too() -> None:
    features, labels, sources = _two_blobs(reference_in_small=0)
    config = ClusteringConfig(reduction="ica", min_silhouette=0.1)  # whitened components dilute the silhouette
    found = detect_clustering(features, labels, sources, config)
    assert set(found.flagged_rows) == set(range(160, 200))


def test_unusable_settings_are_refused() -> None:
    with pytest.raises(DetectionInputError, match="reduction"):
        ClusteringConfig(reduction="tsne")
    with pytest.raises(DetectionInputError, match="components"):
        ClusteringConfig(components=0)
