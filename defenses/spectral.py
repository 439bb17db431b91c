"""Spectral signatures (Tran, Li and Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018): within one
class, backdoored rows shift the learned representation along one direction, so they stand out on the top singular
vector of the class's centred penultimate-layer representations.

Each row's score is its squared projection on that vector. The paper removes the top 1.5 x eps of each class
(`rule="fraction"`, eps the expected poison share); the default `rule="calibrated"` needs no eps: scores are scaled
by their class median and a row is flagged when its conformal p-value against the clean reference rows is at most
`row_alpha`, so a clean row is flagged with probability at most `row_alpha` however much poison there is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from trainguard.defenses.conformal import conformal_p_values
from trainguard.defenses.errors import DetectionInputError
from trainguard.defenses.findings import Findings, check_inputs, findings


@dataclass(frozen=True)
class SpectralConfig:
    """`calibrated`: flag rows with conformal p <= `row_alpha` (0.5%, as label issues': see
    `trainguard.defenses.label_issues`); `fraction`: the paper's top `removal_factor` x `expected_fraction` of each
    class.

    Attributes:
        rule: `"calibrated"` (the default) or `"fraction"`.
        row_alpha: `calibrated`: the largest conformal p-value against the reference rows that flags a row, in (0, 1).
        expected_fraction: `fraction`: the expected poison share of a class, in (0, 1).
        removal_factor: `fraction`: how many times `expected_fraction` of each class is flagged.

    Raises:
        DetectionInputError: An unknown rule, or `row_alpha` or `expected_fraction` outside (0, 1).
    """

    rule: Literal["calibrated", "fraction"] = "calibrated"
    row_alpha: float = 0.005
    expected_fraction: float = 0.1
    removal_factor: float = 1.5

    def __post_init__(self) -> None:
        if self.rule not in ("calibrated", "fraction"):
            raise DetectionInputError(f"spectral: rule must be 'calibrated' or 'fraction', not {self.rule!r}")
        if not (0 < self.row_alpha < 1 and 0 < self.expected_fraction < 1):
            raise DetectionInputError("spectral: row_alpha and expected_fraction must be in (0, 1)")


def spectral_scores(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per class: the squared projection of each centred representation on the class's top singular vector."""
    scores = np.zeros(len(labels), dtype=np.float64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        centred = features[members].astype(np.float64) - features[members].mean(axis=0, dtype=np.float64)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        scores[members] = (centred @ vt[0]) ** 2
    return scores


def spectral_flags(
    scores: np.ndarray, labels: np.ndarray, is_reference: np.ndarray, config: SpectralConfig
) -> np.ndarray:
    """The rows the configured rule flags (reference rows included, to measure the clean rate)."""
    if config.rule == "fraction":
        flagged = np.zeros(len(scores), dtype=bool)
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            count = min(len(members), math.ceil(config.removal_factor * config.expected_fraction * len(members)))
            flagged[members[np.argsort(-scores[members], kind="stable")[:count]]] = True
        return flagged
    scaled = np.zeros_like(scores)
    for label in np.unique(labels):
        members = labels == label
        median = np.median(scores[members])
        scaled[members] = scores[members] / median if median > 0 else 0.0
    return conformal_p_values(scaled[is_reference], scaled) <= config.row_alpha


def detect_spectral(
    features: np.ndarray,
    labels: np.ndarray,
    sources: Sequence[str],
    config: SpectralConfig = SpectralConfig(),
    reference: str = "<reference>",
    alpha: float = 0.01,
) -> Findings:
    """Spectral-signature findings on the rows whose source is not `reference` (those calibrate).

    Args:
        features: Penultimate-layer representations (N, D), finite.
        labels: Integer labels (N,).
        sources: Each row's source; rows of `reference` are clean and only calibrate.
        config: The detector's settings.
        reference: The source name that marks the clean reference rows.
        alpha: The false discovery rate the per-source decisions are held to.

    Returns:
        The `"spectral"` findings: each candidate row's score (its squared projection on its class's top singular
        vector) and flag, and each candidate source's decision.

    Raises:
        DetectionInputError: Shapes that disagree, no reference or no candidate rows, or non-finite features.
    """
    labels = np.asarray(labels)
    is_reference = check_inputs(features, labels, sources, reference)
    scores = spectral_scores(features, labels)
    flagged = spectral_flags(scores, labels, is_reference, config)
    return findings("spectral", scores, flagged, labels, sources, is_reference, alpha)
