"""A screening's outcome (`ScreeningReport`): every decision, the calibration they were measured against, and
its plain JSON-ready form."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from trainguard.defenses.roni.calibration import Calibration
from trainguard.defenses.roni.config import ScreeningConfig
from trainguard.defenses.roni.decision import CandidateDecision, SourceDecision


@dataclass(frozen=True)
class ScreeningReport:
    """All decisions of one screening, the calibration they were measured against and how the copies trained:
    `scope` "full" or "head" (then `head` names the module whose input was the frozen feature), the learning rate
    used and the copies trained at once.

    Attributes:
        decisions: One decision per candidate, in the order given.
        sources: One decision per source judged whole (several tests this cycle or across cycles).
        calibration: What the decisions were measured against; pass it to the next screening of the same model,
            trusted and held-out data.
        config: The screening's config.
        seconds: The screening's wall time.
        base_soft_accuracy: The deployed model's held-out soft accuracy before any fine-tuning.
        head: The module whose input was the frozen feature (head scope), else None.
    """

    decisions: tuple[CandidateDecision, ...]
    sources: tuple[SourceDecision, ...]
    calibration: Calibration
    config: ScreeningConfig
    seconds: float
    base_soft_accuracy: float
    head: str | None

    @property
    def accepted(self) -> tuple[CandidateDecision, ...]:
        return tuple(d for d in self.decisions if d.accepted)

    @property
    def rejected(self) -> tuple[CandidateDecision, ...]:
        return tuple(d for d in self.decisions if not d.accepted)

    @property
    def scope(self) -> str:
        return self.calibration.scope

    @property
    def lr(self) -> float:
        return self.calibration.lr

    @property
    def chunk_size(self) -> int | None:
        return self.calibration.chunk_size

    @property
    def flagged(self) -> tuple[SourceDecision, ...]:
        return tuple(s for s in self.sources if s.flagged)

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready data; non-finite numbers (classes absent from the held-out set) become None."""
        decisions = [
            {**asdict(d), "class_impacts": _finite(d.class_impacts), "score": _number(d.score)} for d in self.decisions
        ]
        calibration = [
            {
                "size": c.size,
                "counts": None if c.counts is None else list(c.counts),
                "draws": len(c.scores),
                "impact_quantiles": _quantiles(c.impacts),
                "score_quantiles": _quantiles(c.scores),
            }
            for c in self.calibration.strata
        ]
        return {
            "level": self.config.level,
            "error_control": self.config.error_control,
            "combination": self.config.combination,
            "calibration": calibration,
            "base_soft_accuracy": self.base_soft_accuracy,
            "seconds": self.seconds,
            "scope": self.calibration.scope,
            "head": self.head,
            "lr": self.calibration.lr,
            "lr_probe": [{"lr": lr, "separation": separation} for lr, separation in self.calibration.probed],
            "chunk_size": self.calibration.chunk_size,
            "config": asdict(self.config),
            "decisions": decisions,
            "sources": [
                {**asdict(s), "union_impact": _number(s.union_impact), "class_impacts": _finite(s.class_impacts)}
                for s in self.sources
            ],
        }


def _number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _finite(values: Sequence[float]) -> list[float | None]:
    return [_number(v) for v in values]


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    qs = np.quantile(np.asarray(values, dtype=np.float64), [0.5, 0.9, 0.99, 1.0])
    return {"median": float(qs[0]), "q90": float(qs[1]), "q99": float(qs[2]), "max": float(qs[3])}
