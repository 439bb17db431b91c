"""Confident learning (Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset
Labels", JAIR 2021) through cleanlab: rows whose given label disagrees with out-of-sample predicted probabilities
beyond what the estimated class-conditional noise explains are label issues, e.g. flipped labels.

The probabilities must be out-of-sample: the model's own on rows it never trained on (a cycle's new candidates and
held-out rows), or, by default, cross-validated predictions of a logistic regression on the features.

cleanlab flags every confident mistake of the model, 1-3% of clean digits rows with the benchmark's MLP, and
`quarantine-rows` leaves each flagged row out of training. A row is therefore flagged only where cleanlab finds it
an issue and its score is also in the clean reference's upper `row_alpha` tail (conformal p <= `row_alpha`), so at
most that share of clean rows is lost; flipped rows, which the model contradicts outright, stay flagged. The
default, 0.5%, is spectral's too: the two row flags together cost at most 1% of clean rows (issue #26 asks at most 3%
for RONI's false rejections and every detector together; at 1% each they cost 1.3-1.7% on digits over 20 seeds, at
0.5% each 0.2-1.1% over 4, while flipped rows of the test fixture were still found at 0.78 instead of 0.82).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trainguard.defenses.conformal import conformal_p_values
from trainguard.defenses.errors import DetectionInputError
from trainguard.defenses.findings import Findings, check_inputs, findings


@dataclass(frozen=True)
class LabelIssuesConfig:
    """cleanlab's `filter_by` rule, the share of clean rows a row flag may cost (`row_alpha`, calibrated on the
    reference rows) and the folds of the default cross-validated probabilities.

    Attributes:
        filter_by: cleanlab's `find_label_issues` rule, e.g. `"prune_by_noise_rate"`.
        row_alpha: The largest conformal p-value against the reference rows' scores that flags an issue, in (0, 1].
        folds: Cross-validation folds of the default probabilities (>= 2; fewer where a class has fewer rows).
        seed: Seeds the folds.

    Raises:
        DetectionInputError: Fewer than 2 folds, or `row_alpha` outside (0, 1].
    """

    filter_by: str = "prune_by_noise_rate"
    row_alpha: float = 0.005
    folds: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise DetectionInputError("label issues: folds must be >= 2")
        if not 0 < self.row_alpha <= 1:
            raise DetectionInputError(f"label issues: row_alpha must be in (0, 1], not {self.row_alpha}")


def cross_validated_probabilities(
    features: np.ndarray, labels: np.ndarray, num_classes: int, config: LabelIssuesConfig
) -> np.ndarray:
    """Out-of-fold class probabilities (N, num_classes) of a standardised logistic regression on the features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    present = np.unique(labels)
    smallest = int(np.bincount(labels)[present].min())
    folds = max(2, min(config.folds, smallest))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=0.1))
    splitter = StratifiedKFold(folds, shuffle=True, random_state=config.seed)
    predicted = cross_val_predict(model, features, labels, cv=splitter, method="predict_proba")
    probabilities = np.full((len(labels), num_classes), 1e-6)
    probabilities[:, present] = predicted
    normalised: np.ndarray = probabilities / probabilities.sum(axis=1, keepdims=True)
    return normalised


def detect_label_issues(
    features: np.ndarray,
    labels: np.ndarray,
    sources: Sequence[str],
    config: LabelIssuesConfig = LabelIssuesConfig(),
    reference: str = "<reference>",
    alpha: float = 0.01,
    pred_probs: np.ndarray | None = None,
) -> Findings:
    """cleanlab's label issues among all rows; findings on the rows whose source is not `reference`. A row's score
    is 1 - its label quality (cleanlab's self-confidence).

    Args:
        features: Penultimate-layer representations (N, D), finite.
        labels: Integer labels (N,).
        sources: Each row's source; rows of `reference` are clean and only calibrate.
        config: The detector's settings.
        reference: The source name that marks the clean reference rows.
        alpha: The false discovery rate the per-source decisions are held to.
        pred_probs: Out-of-sample class probabilities (N, K); None: a cross-validated logistic regression's on the
            features.

    Returns:
        The `"label-issues"` findings.

    Raises:
        DetectionInputError: Shapes that disagree, no reference or no candidate rows, non-finite features, or
            `pred_probs` that do not cover the labels.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    is_reference = check_inputs(features, labels, sources, reference)
    if pred_probs is None:
        pred_probs = cross_validated_probabilities(features, labels, int(labels.max()) + 1, config)
    if pred_probs.shape[0] != len(labels) or labels.max() >= pred_probs.shape[1] or labels.min() < 0:
        raise DetectionInputError(f"label issues: pred_probs {pred_probs.shape} do not cover {len(labels)} labels")
    # n_jobs=1: cleanlab's worker pool forks this process (torch threads, a tracking client) and, under any start
    # method but fork, loses the globals it shares with the workers; per class the work is milliseconds anyway.
    issues = find_label_issues(labels, pred_probs, filter_by=config.filter_by, n_jobs=1)
    scores = 1.0 - get_label_quality_scores(labels, pred_probs)
    flagged = issues & (conformal_p_values(scores[is_reference], scores) <= config.row_alpha)
    return findings("label-issues", scores, flagged, labels, sources, is_reference, alpha)
