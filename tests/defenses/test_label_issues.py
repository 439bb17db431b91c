"""Confident learning (cleanlab) finds flipped labels and their source, and leaves clean sources alone."""

from __future__ import annotations

import pytest

from trainguard.defenses.detectors import DetectionConfig, detect
from trainguard.defenses.errors import DetectionInputError
from trainguard.defenses.label_issues import LabelIssuesConfig, detect_label_issues


def test_flipped_labels_are_found_with_cross_validated_probabilities(flipped_digits) -> None:
    s = flipped_digits
    found = detect_label_issues(s.features, s.labels, s.sources)
    assert s.rate(found.flagged_rows, poisoned=True) >= 0.8
    assert s.rate(found.flagged_rows, poisoned=False) <= 0.03
    assert found.flagged_sources == ("mallory",)


def test_flipped_labels_are_found_with_the_models_own_probabilities(flipped_digits) -> None:
    s = flipped_digits
    found = detect_label_issues(s.features, s.labels, s.sources, pred_probs=s.pred_probs)
    assert s.rate(found.flagged_rows, poisoned=True) >= 0.75  # 0.78 at row_alpha 0.005, 0.82 at 0.01
    assert s.rate(found.flagged_rows, poisoned=False) <= 0.03
    assert found.flagged_sources == ("mallory",)


def test_clean_labels_flag_few_rows_and_no_source(flipped_digits) -> None:
    s = flipped_digits
    clean = s.sources != "mallory"
    found = detect_label_issues(s.features[clean], s.labels[clean], s.sources[clean], pred_probs=s.pred_probs[clean])
    assert len(found.flagged_rows) / len(found.rows) <= 0.03
    assert found.flagged_sources == ()


def test_all_detectors_together_flag_only_the_flipping_source(flipped_digits) -> None:
    s = flipped_digits
    detections = detect(s.features, s.labels, s.sources, DetectionConfig(), pred_probs=s.pred_probs)
    assert detections.flagged_sources == ("mallory",)
    assert [f.detector for f in detections.findings] == ["spectral", "clustering", "label-issues"]
    assert all(f.alpha == pytest.approx(0.01 / 3) for f in detections.findings)
    assert detections.to_dict()["flagged_rows"] == len(detections.flagged_rows)


def test_probabilities_that_do_not_cover_the_labels_are_refused(flipped_digits) -> None:
    s = flipped_digits
    with pytest.raises(DetectionInputError, match="pred_probs"):
        detect_label_issues(s.features, s.labels, s.sources, pred_probs=s.pred_probs[:, :5])
    with pytest.raises(DetectionInputError, match="unknown detectors"):
        DetectionConfig(detectors=("roni",))


def test_row_flags_cost_at_most_row_alpha_of_clean_rows(flipped_digits) -> None:
    s = flipped_digits
    cleanlab_alone = detect_label_issues(
        s.features, s.labels, s.sources, LabelIssuesConfig(row_alpha=1.0), pred_probs=s.pred_probs
    )
    calibrated = detect_label_issues(s.features, s.labels, s.sources, pred_probs=s.pred_probs)
    assert set(calibrated.flagged_rows) <= set(cleanlab_alone.flagged_rows)
    clean_lost = s.rate(calibrated.flagged_rows, poisoned=False)
    assert clean_lost <= 0.015
    assert clean_lost < s.rate(cleanlab_alone.flagged_rows, poisoned=False)
    assert s.rate(calibrated.flagged_rows, poisoned=True) >= 0.75


def test_a_row_alpha_outside_0_1_is_refused() -> None:
    with pytest.raises(DetectionInputError, match="row_alpha"):
        LabelIssuesConfig(row_alpha=0.0)
