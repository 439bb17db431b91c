"""What a row-level poisoning detector found: per-row scores and flags, and per-source decisions held to an error
budget.

A source is flagged when its share of flagged rows is significantly above the clean rate, the share the same
detector flags among reference rows known to be clean (the trusted held-out pool): a one-sided binomial test per
source, then Benjamini-Hochberg across the cycle's sources, so the expected share of clean sources among those
flagged stays at `alpha`. A detector's own row rule may flag clean rows; the source decision pays for that.

A detector that flags rows together (activation clustering flags whole clusters) breaks the binomial test's
independence: a clean source holding much of a flagged clean cluster would fail it. Such a detector also gives a
`concentration` p-value per source (is the source over-represented among the flagged rows, against the other
candidate sources?), and the source's p-value is the larger of the two: flagged only when both tests reject.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainguard.defenses.errors import DetectionInputError


@dataclass(frozen=True)
class RowFinding:
    """One row of the candidates: `row` is its index in the arrays the detector was given."""

    row: int
    source: str
    label: int
    score: float
    flagged: bool


@dataclass(frozen=True)
class SourceFinding:
    """One source's flagged share, its binomial p-value against the clean rate, the BH-adjusted q-value, and the
    decision (`flagged` when q <= alpha)."""

    source: str
    rows: int
    flagged_rows: int
    fraction: float
    p_value: float
    q_value: float
    flagged: bool


@dataclass(frozen=True)
class Findings:
    """One detector's findings on the candidate rows (reference rows only calibrate the clean rate)."""

    detector: str
    rows: tuple[RowFinding, ...]
    sources: tuple[SourceFinding, ...]
    clean_rate: float
    reference_rows: int
    alpha: float

    @property
    def flagged_rows(self) -> tuple[int, ...]:
        return tuple(r.row for r in self.rows if r.flagged)

    @property
    def flagged_sources(self) -> tuple[str, ...]:
        return tuple(s.source for s in self.sources if s.flagged)

    def summary(self) -> dict[str, Any]:
        """The figures worth a metric or a report line (no per-row data)."""
        return {
            "detector": self.detector,
            "rows": len(self.rows),
            "flagged_rows": len(self.flagged_rows),
            "clean_rate": self.clean_rate,
            "reference_rows": self.reference_rows,
            "alpha": self.alpha,
            "flagged_sources": list(self.flagged_sources),
            "sources": [vars(s) for s in self.sources],
        }


def check_inputs(features: np.ndarray, labels: np.ndarray, sources: Sequence[str], reference: str) -> np.ndarray:
    """The reference mask, after checking the arrays agree and both reference and candidate rows are present."""
    if features.ndim != 2 or len(features) != len(labels) or len(labels) != len(sources):
        raise DetectionInputError(
            f"detection needs (N, D) features, N labels and N sources; got {features.shape}, {len(labels)} labels, "
            f"{len(sources)} sources"
        )
    is_reference = np.asarray(sources, dtype=object) == reference
    if not is_reference.any() or is_reference.all():
        raise DetectionInputError(f"detection needs reference rows (source {reference!r}) and candidate rows")
    if not np.isfinite(features).all():
        raise DetectionInputError("detection features hold NaN or infinite values")
    return is_reference


def conformal_p_values(scores: np.ndarray, is_reference: np.ndarray) -> np.ndarray:
    """Each row's conformal p-value against the reference rows' scores: (1 + #reference >= score) / (n + 1), valid
    for a clean row exchangeable with the reference, so flagging at p <= a flags at most a share a of clean rows."""
    calibration = np.sort(scores[is_reference])
    above = len(calibration) - np.searchsorted(calibration, scores, side="left")
    return (1.0 + above) / (len(calibration) + 1.0)


def findings(
    detector: str,
    scores: np.ndarray,
    flagged: np.ndarray,
    labels: np.ndarray,
    sources: Sequence[str],
    is_reference: np.ndarray,
    alpha: float,
    concentration: Mapping[str, float] | None = None,
) -> Findings:
    """Row findings for the candidate rows and the per-source decisions, from a detector's scores and flags (and,
    for a detector that flags rows in groups, each source's `concentration` p-value, which bounds its own from
    below)."""
    from scipy.stats import binomtest, false_discovery_control

    names = np.asarray(sources, dtype=object)
    reference_flags = int(flagged[is_reference].sum())
    reference_rows = int(is_reference.sum())
    clean_rate = (reference_flags + 1) / (reference_rows + 2)  # never 0: one flag must not condemn a source
    candidates = np.flatnonzero(~is_reference)
    rows = tuple(
        RowFinding(int(i), str(names[i]), int(labels[i]), float(scores[i]), bool(flagged[i])) for i in candidates
    )
    order = sorted({str(names[i]) for i in candidates})
    counts = [(int((names == s).sum()), int((flagged & (names == s)).sum())) for s in order]
    p_values = np.array([binomtest(k, n, clean_rate, alternative="greater").pvalue for n, k in counts])
    if concentration is not None:
        p_values = np.maximum(p_values, [concentration.get(s, 1.0) for s in order])
    q_values = false_discovery_control(p_values) if len(p_values) else p_values
    sources_found = tuple(
        SourceFinding(s, n, k, k / n, float(p), float(q), bool(q <= alpha))
        for s, (n, k), p, q in zip(order, counts, p_values, q_values, strict=True)
    )
    return Findings(detector, rows, sources_found, clean_rate, reference_rows, alpha)
