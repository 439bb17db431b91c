"""What a row-level poisoning detector found: per-row scores and flags, and per-source decisions held to an error
budget.

A source is flagged when it holds significantly more flagged rows than clean rows of its classes would: the clean
rate is measured per class, on the reference rows known to be clean (the trusted held-out pool), since detectors flag
hard classes more often and a clean source holding only hard classes (a clinic that sees a few conditions) must not
pay for its composition. Per class the rate is smoothed towards the pooled one, r = (flagged + 1) / (rows + 2): its
prior is Beta(1, 1/r - 1) (one pseudo-flag in 1/r pseudo-rows, so a class without reference flags is not taken for
flawless and one flag never condemns a source), its posterior Beta(1 + k, 1/r - 1 + n - k) after k of the class's n
reference rows were flagged. The source's flagged count of each class is that posterior's Beta-binomial predictive
(a class with few reference rows is uncertain, which a plug-in binomial would hide), and the source's p-value is the
upper tail of their exact convolution. Then Benjamini-Hochberg across the cycle's sources keeps the expected share
of clean sources among those flagged at `alpha`. A detector's own row rule may flag clean rows; the source decision
pays for that.

A detector that flags rows together (activation clustering flags whole clusters) breaks the per-row test's
independence: a clean source holding much of a flagged clean cluster would fail it. Such a detector also gives a
`concentration` p-value per source (is the source over-represented among the flagged rows, against the other
candidate sources?), and the source's p-value is the larger of the two: flagged only when both tests reject.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainguard.defenses.conformal import step_up_adjusted
from trainguard.defenses.errors import DetectionInputError


@dataclass(frozen=True)
class RowFinding:
    """One row of the candidates: `row` is its index in the arrays the detector was given.

    Attributes:
        row: The row's index in the features, labels and sources the detector was given.
        source: Its source.
        label: Its label.
        score: The detector's score (higher: more suspect).
        flagged: Whether the detector's row rule flags it.
    """

    row: int
    source: str
    label: int
    score: float
    flagged: bool


@dataclass(frozen=True)
class SourceFinding:
    """One source's flagged share, the flagged rows expected of a clean source of its classes, its p-value against
    the per-class clean rates, the BH-adjusted q-value, and the decision (`flagged` when q <= alpha).

    Attributes:
        source: The source.
        rows: Its candidate rows.
        flagged_rows: How many of them the detector flagged.
        fraction: `flagged_rows / rows`.
        expected: The flagged rows expected of a clean source with its classes.
        p_value: P(a clean source of its classes has at least `flagged_rows` flagged), for a detector that flags
            rows in groups at least its concentration p-value.
        q_value: The Benjamini-Hochberg adjusted p-value across the sources.
        flagged: Whether `q_value <= alpha`.
    """

    source: str
    rows: int
    flagged_rows: int
    fraction: float
    expected: float
    p_value: float
    q_value: float
    flagged: bool


@dataclass(frozen=True)
class Findings:
    """One detector's findings on the candidate rows (reference rows only calibrate the clean rates); `clean_rate`
    is the reference's pooled rate (Laplace's rule), for reports; sources are tested per class.

    Attributes:
        detector: `"spectral"`, `"clustering"` or `"label-issues"`.
        rows: One finding per candidate row.
        sources: One decision per candidate source, sorted by name.
        clean_rate: The reference rows' pooled flag rate, (flagged + 1) / (rows + 2).
        reference_rows: How many reference rows calibrated it.
        alpha: The false discovery rate the source decisions were held to.
    """

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
    is_reference: np.ndarray = np.asarray(sources, dtype=object) == reference
    if not is_reference.any() or is_reference.all():
        raise DetectionInputError(f"detection needs reference rows (source {reference!r}) and candidate rows")
    if not np.isfinite(features).all():
        raise DetectionInputError("detection features hold NaN or infinite values")
    return is_reference


def clean_flag_tail(
    source_labels: np.ndarray, flagged: int, reference_labels: np.ndarray, reference_flagged: np.ndarray
) -> tuple[float, float]:
    """P(a clean source of these labels has at least `flagged` flagged rows) and the expected count: per class, the
    Beta-binomial predictive of its rows under the Beta(1 + k, 1/r - 1 + n - k) posterior of the reference's rate
    (k of its n reference rows of that class flagged, r the pooled rate), convolved over classes exactly."""
    from scipy.stats import betabinom

    size = int(max(source_labels.max(), reference_labels.max(initial=0))) + 1
    rows = np.bincount(source_labels, minlength=size)
    references = np.bincount(reference_labels, minlength=size)
    hits = np.bincount(reference_labels[reference_flagged], minlength=size)
    pooled = (hits.sum() + 1) / (references.sum() + 2)
    pmf, expected = np.ones(1), 0.0
    for label in np.flatnonzero(rows):
        a, b = 1.0 + hits[label], 1.0 / pooled - 1.0 + references[label] - hits[label]
        pmf = np.convolve(pmf, betabinom.pmf(np.arange(rows[label] + 1), rows[label], a, b))
        expected += rows[label] * a / (a + b)
    tail = float(min(1.0, pmf[flagged:].sum()))
    return max(tail, np.finfo(np.float64).tiny), expected


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
    names = np.asarray(sources, dtype=object)
    reference_flags = int(flagged[is_reference].sum())
    reference_rows = int(is_reference.sum())
    clean_rate = (reference_flags + 1) / (reference_rows + 2)
    candidates = np.flatnonzero(~is_reference)
    rows = tuple(
        RowFinding(int(i), str(names[i]), int(labels[i]), float(scores[i]), bool(flagged[i])) for i in candidates
    )
    labels = np.asarray(labels, dtype=np.int64)
    order = sorted({str(names[i]) for i in candidates})
    counts = [(int((names == s).sum()), int((flagged & (names == s)).sum())) for s in order]
    tails = [
        clean_flag_tail(labels[names == s], k, labels[is_reference], flagged[is_reference])
        for s, (_, k) in zip(order, counts, strict=True)
    ]
    p_values = np.array([p for p, _ in tails])
    if concentration is not None:
        p_values = np.maximum(p_values, [concentration.get(s, 1.0) for s in order])
    q_values = step_up_adjusted(p_values, "bh")
    sources_found = tuple(
        SourceFinding(s, n, k, k / n, expected, float(p), float(q), bool(q <= alpha))
        for s, (n, k), (_, expected), p, q in zip(order, counts, tails, p_values, q_values, strict=True)
    )
    return Findings(detector, rows, sources_found, clean_rate, reference_rows, alpha)
