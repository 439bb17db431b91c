"""The verdicts: each source judged whole (its union's test and the combination of all its p-values), the p-values
adjusted for the cycle's tests (per candidate, or the false discovery rate) and compared with the level, each with a
one-line reason."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from trainguard.defenses.conformal import bonferroni_min, combined, step_up_adjusted
from trainguard.defenses.roni.candidates import Candidate
from trainguard.defenses.roni.config import ScreeningConfig
from trainguard.defenses.roni.sequential import _Tested


@dataclass(frozen=True)
class CandidateDecision:
    """One shard's test: its impacts after the last step (`impact` overall, `class_impacts` per class: how far the
    mean held-out margin was pushed down), its statistic (`score`) and p-value against `calibration_size`-row draws,
    its source's p-value, the adjusted p-value compared with the level, and the verdict with a one-line reason.

    Attributes:
        name: The candidate's name.
        source: Its source.
        size: Its rows.
        impact: How far the mean held-out margin was pushed down after the last step.
        class_impacts: The same per class (empty unless per-class metrics were measured).
        score: The statistic over all metrics and checkpoints, tested against clean draws.
        p_value: Its sequential p-value against clean draws.
        source_p_value: Its source's p-value when the source was judged whole, else None.
        adjusted_p_value: The p-value compared with the level: its own adjusted one, or its source's if lower.
        calibration_size: The rows of the clean draws it was compared with.
        accepted: Whether it is accepted for training.
        reason: Why, in one line.
    """

    name: str
    source: str
    size: int
    impact: float
    class_impacts: tuple[float, ...]
    score: float
    p_value: float
    source_p_value: float | None
    adjusted_p_value: float
    calibration_size: int
    accepted: bool
    reason: str


@dataclass(frozen=True)
class SourceDecision:
    """A source judged as a whole: the union of its shards screened size-matched (when it has several this cycle),
    the combination of all its shard p-values (`earlier` of them from previous cycles), and whether it is flagged
    (then every shard of it is rejected). `evidence`: the other tests' p-values that joined the combination;
    `class_impacts`: the union's per-class drops of the held-out margin (empty without a union).

    Attributes:
        source: The source.
        shards: The names of its shards screened this cycle.
        rows: Their rows.
        union_impact: The overall impact of the union of its shards (None without a union).
        union_p_value: The union's p-value (None without a union).
        combined_p_value: The combination of all its shard p-values and `evidence`.
        earlier: How many of the combined p-values came from earlier cycles.
        p_value: The union and the combination as one test (Bonferroni).
        adjusted_p_value: `p_value` adjusted for the cycle's tests, compared with the level.
        flagged: Whether the source is flagged (then every shard of it is rejected).
        reason: Why, in one line.
        evidence: The other tests' p-values that joined the combination.
        class_impacts: The union's per-class drops of the held-out margin.
    """

    source: str
    shards: tuple[str, ...]
    rows: int
    union_impact: float | None
    union_p_value: float | None
    combined_p_value: float
    earlier: int
    p_value: float
    adjusted_p_value: float
    flagged: bool
    reason: str
    evidence: tuple[float, ...] = ()
    class_impacts: tuple[float, ...] = ()


@dataclass(frozen=True)
class _SourceEvidence:
    source: str
    shards: tuple[str, ...]
    rows: int
    union: _Tested | None
    combined_p: float
    earlier: int
    other: tuple[float, ...]

    @property
    def p_value(self) -> float:
        """Union and combination as one test (Bonferroni: they are far from independent)."""
        tests = [self.combined_p] if self.union is None else [self.combined_p, self.union.p_value]
        return bonferroni_min(tests)


def _source_evidence(
    candidates: Sequence[Candidate],
    tested: Sequence[int],
    trusted_rows: int,
    tests: Sequence[_Tested],
    unions: Mapping[str, _Tested],
    history: Mapping[str, Sequence[float]],
    evidence: Mapping[str, Sequence[float]],
    config: ScreeningConfig,
) -> dict[str, _SourceEvidence]:
    """Sources with more than one test (this cycle's shards, earlier cycles' and other evidence): judged whole.
    `tested`: the rows each candidate was fine-tuned on; with `trusted_rows` they give the correlation Brown's method
    assumes between a source's tests (a shard of n rows shares the trusted sample's noise: n / (n + trusted_rows))."""
    out = {}
    for source in dict.fromkeys(c.source for c in candidates):
        mine = [i for i, c in enumerate(candidates) if c.source == source]
        earlier = [float(p) for p in history.get(source, ())]
        other = tuple(float(p) for p in evidence.get(source, ()))
        if len(mine) + len(earlier) + len(other) < 2:
            continue
        p_values = [*earlier, *(tests[i].p_value for i in mine), *other]
        rows = float(np.median([tested[i] for i in mine]))
        out[source] = _SourceEvidence(
            source,
            tuple(candidates[i].name for i in mine),
            sum(len(candidates[i].data) for i in mine),
            unions.get(source),
            combined(p_values, config.combination, rows / (rows + trusted_rows)),
            len(earlier),
            other,
        )
    return out


def _decide(
    candidates: Sequence[Candidate],
    tested: Sequence[int],
    tests: Sequence[_Tested],
    sources: Mapping[str, _SourceEvidence],
    config: ScreeningConfig,
) -> tuple[tuple[CandidateDecision, ...], tuple[SourceDecision, ...]]:
    """Adjusted p-values per shard and per source, compared with the level; non-finite impacts fail closed.
    `tested`: the rows each candidate was fine-tuned on (fewer than its own when subsampled)."""
    shard_p = np.array([t.p_value for t in tests])
    source_p = np.array([s.p_value for s in sources.values()])
    if config.error_control == "per-candidate":
        adjusted_sources = np.minimum(1.0, 2 * source_p)
        adjusted_shards = np.array(
            [min(1.0, 2 * p) if c.source in sources else p for p, c in zip(shard_p, candidates, strict=True)]
        )
    else:
        both = step_up_adjusted(np.concatenate([shard_p, source_p]), config.error_control)
        adjusted_shards, adjusted_sources = both[: len(shard_p)], both[len(shard_p) :]
    source_decisions = {
        s.source: _source_decision(s, float(a), config) for s, a in zip(sources.values(), adjusted_sources, strict=True)
    }
    decisions = []
    for candidate, rows, test, own in zip(candidates, tested, tests, adjusted_shards, strict=True):
        source = source_decisions.get(candidate.source)
        adjusted = min(float(own), source.adjusted_p_value) if source else float(own)
        if not test.finite:
            reason = "held-out metrics became non-finite when fine-tuning on this candidate"
        elif own <= config.level:
            reason = (
                f"p-value {test.p_value:.3g} (adjusted {own:.3g}) <= level {config.level:g}: "
                f"{test.worst(config.marks)} against clean {test.calibration.size}-row draws"
                f"{'' if test.calibration.counts is None else ' of its label histogram'}"
                f"{_subsampled(len(candidate.data), rows)}"
            )
        elif source is not None and source.flagged:
            reason = source.reason
        else:
            reason = f"p-value {test.p_value:.3g} (adjusted {adjusted:.3g}) above level {config.level:g}"
        decisions.append(
            CandidateDecision(
                name=candidate.name,
                source=candidate.source,
                size=len(candidate.data),
                impact=float(test.last[0]),
                class_impacts=tuple(float(v) for v in test.last[1:]),
                score=test.score,
                p_value=test.p_value,
                source_p_value=source.p_value if source else None,
                adjusted_p_value=adjusted,
                calibration_size=test.calibration.size,
                accepted=test.finite and adjusted > config.level,
                reason=reason,
            )
        )
    return tuple(decisions), tuple(source_decisions.values())


def _source_decision(evidence: _SourceEvidence, adjusted: float, config: ScreeningConfig) -> SourceDecision:
    union = evidence.union
    broken = union is not None and not union.finite
    flagged = broken or adjusted <= config.level
    tested = len(evidence.shards) + evidence.earlier
    others = (
        f" and {len(evidence.other)} detector p-value{'s' if len(evidence.other) > 1 else ''}" if evidence.other else ""
    )
    parts = [
        f"{config.combination} over {tested} shard tests ({evidence.earlier} earlier){others} "
        f"p={evidence.combined_p:.3g}"
    ]
    if union is not None:
        parts.append(f"union of {evidence.rows} rows p={union.p_value:.3g}")
    verdict = ("flagged", "<=") if flagged else ("not flagged", "above")
    reason = (
        f"source {evidence.source} {verdict[0]}: combined p-value {evidence.p_value:.3g} (adjusted {adjusted:.3g}) "
        f"{verdict[1]} level {config.level:g}; {', '.join(parts)}"
    )
    return SourceDecision(
        source=evidence.source,
        shards=evidence.shards,
        rows=evidence.rows,
        union_impact=float(union.last[0]) if union is not None else None,
        union_p_value=union.p_value if union is not None else None,
        combined_p_value=evidence.combined_p,
        earlier=evidence.earlier,
        p_value=evidence.p_value,
        adjusted_p_value=adjusted,
        flagged=flagged,
        reason=reason,
        evidence=evidence.other,
        class_impacts=tuple(float(v) for v in union.last[1:]) if union is not None else (),
    )


def _subsampled(size: int, tested: int) -> str:
    """How a reason says that a candidate was tested on a subsample (`pool_fraction`)."""
    return f" (tested on a seeded {tested}-row subsample of its {size} rows)" if tested < size else ""
