"""The row-level poisoning detectors side by side: spectral signatures, activation clustering and confident-learning
label issues, run on one set of features, labels and sources, with reference rows that calibrate each detector's
clean rate per class (`defenses.findings`: a source is held to the rates of the classes it holds).

`alpha` is the budget of falsely flagged clean sources for all detectors together: each detector's source test runs
at alpha / (number of detectors) (Bonferroni), since a source flagged by any of them is acted on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainguard.defenses.clustering import ClusteringConfig, detect_clustering
from trainguard.defenses.errors import DetectionInputError
from trainguard.defenses.findings import Findings
from trainguard.defenses.label_issues import LabelIssuesConfig, detect_label_issues
from trainguard.defenses.spectral import SpectralConfig, detect_spectral

DETECTORS = ("spectral", "clustering", "label-issues")
REFERENCE = "<reference>"
"""The source name of the reference rows: not a valid contributor id, so no contributor can pose as the reference."""


@dataclass(frozen=True)
class DetectionConfig:
    """Which detectors run, each one's settings, the overall per-source error budget and the reference's name.

    Attributes:
        detectors: The detectors to run, from `"spectral"`, `"clustering"` and `"label-issues"` (default all).
        spectral: The spectral-signature detector's settings.
        clustering: The activation-clustering detector's settings.
        label_issues: The label-issue detector's settings.
        alpha: The false discovery rate of flagged sources for all detectors together, in (0, 1); each detector
            runs at alpha / (number of detectors).
        reference: The source name that marks clean reference rows.

    Raises:
        DetectionInputError: An unknown detector, none, or alpha outside (0, 1).
    """

    detectors: tuple[str, ...] = DETECTORS
    spectral: SpectralConfig = field(default_factory=SpectralConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    label_issues: LabelIssuesConfig = field(default_factory=LabelIssuesConfig)
    alpha: float = 0.01
    reference: str = REFERENCE

    def __post_init__(self) -> None:
        unknown = sorted(set(self.detectors) - set(DETECTORS))
        if unknown or not self.detectors:
            raise DetectionInputError(f"detection: unknown detectors {unknown}; choose from {list(DETECTORS)}")
        if not 0 < self.alpha < 1:
            raise DetectionInputError(f"detection: alpha must be in (0, 1), not {self.alpha}")


@dataclass(frozen=True)
class Detections:
    """Every configured detector's findings, and their union: rows and sources flagged by any of them.

    Attributes:
        findings: One `Findings` per detector, in the configured order.
    """

    findings: tuple[Findings, ...]

    @property
    def flagged_rows(self) -> frozenset[int]:
        return frozenset(row for f in self.findings for row in f.flagged_rows)

    @property
    def flagged_sources(self) -> tuple[str, ...]:
        return tuple(sorted({s for f in self.findings for s in f.flagged_sources}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "flagged_sources": list(self.flagged_sources),
            "flagged_rows": len(self.flagged_rows),
            "detectors": {f.detector: f.summary() for f in self.findings},
        }


def detect(
    features: np.ndarray,
    labels: np.ndarray,
    sources: Sequence[str],
    config: DetectionConfig = DetectionConfig(),
    *,
    pred_probs: np.ndarray | None = None,
) -> Detections:
    """Runs the configured detectors on penultimate-layer `features` (N, D) with their `labels` (N,) and `sources`
    (N,); rows whose source is `config.reference` are clean reference rows that calibrate. `pred_probs` (N, K), the
    model's out-of-sample probabilities, feed the label-issue detector (default: cross-validated on the features).

    Args:
        features: Penultimate-layer representations (N, D), finite.
        labels: Integer labels (N,).
        sources: Each row's source; `config.reference` marks the clean reference rows.
        config: Which detectors run and their settings.
        pred_probs: Out-of-sample class probabilities (N, K) for the label-issue detector.

    Returns:
        Each detector's findings and their union.

    Raises:
        DetectionInputError: Shapes that disagree, no reference or no candidate rows, non-finite features, or
            `pred_probs` that do not cover the labels.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    alpha = config.alpha / len(config.detectors)
    reference = config.reference
    runs = {
        "spectral": lambda: detect_spectral(
            features, labels, sources, config.spectral, reference=reference, alpha=alpha
        ),
        "clustering": lambda: detect_clustering(
            features, labels, sources, config.clustering, reference=reference, alpha=alpha
        ),
        "label-issues": lambda: detect_label_issues(
            features, labels, sources, config.label_issues, pred_probs=pred_probs, reference=reference, alpha=alpha
        ),
    }
    return Detections(tuple(runs[name]() for name in config.detectors))
