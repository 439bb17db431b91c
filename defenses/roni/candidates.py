"""What is screened: a shard or the union of a source's shards (`Candidate`), cut down to what clean draws of the
trusted rows can stand for (`pool_fraction`: at most that share of the trusted rows of each class)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from trainguard.defenses.heldout import LabeledData


@dataclass(frozen=True)
class Candidate:
    """One shard (or the concatenated shards of one source) offered for this cycle's training.

    Attributes:
        name: A name unique among the candidates of a screening (e.g. the shard's).
        source: Its source: a source's candidates are also judged together.
        data: Its rows.
    """

    name: str
    source: str
    data: LabeledData


def group_by_source(candidates: Sequence[Candidate]) -> list[Candidate]:
    """One candidate per source, concatenating its shards (names joined with '+'), in first-seen order."""
    groups: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        groups.setdefault(candidate.source, []).append(candidate)
    return [
        Candidate(name="+".join(c.name for c in group), source=source, data=LabeledData.concat([c.data for c in group]))
        for source, group in groups.items()
    ]


def supported_level(pool_rows: int) -> float:
    """The smallest error rate calibration draws from `pool_rows` trusted rows of a class can stand for, at best: a
    fresh row lies beyond all of them (on any one reading) with probability 1 / (pool_rows + 1), and no draw of
    them ever does."""
    return 1.0 / (pool_rows + 1)


def class_cap(pool_rows: int, fraction: float) -> int:
    """The most rows of one class a stratified candidate is tested on, with `pool_rows` trusted rows of that class
    (`ScreeningConfig.pool_fraction`: draws can stand for fresh rows only while they need a small share of them)."""
    return max(1, int(fraction * pool_rows))


def _within_pool(candidate: Candidate, pool: np.ndarray, fraction: float, seed: int) -> Candidate:
    """The candidate, or a seeded subsample holding at most `fraction` of the trusted rows (`pool`: per class) of
    each class: what clean draws of the trusted rows can stand for (see the package docstring)."""
    labels = candidate.data.y.long().numpy()
    rng = np.random.default_rng([seed, *candidate.name.encode()])
    keep = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        limit = class_cap(int(pool[label]) if label < len(pool) else 0, fraction)
        keep.append(rows if len(rows) <= limit else np.sort(rng.choice(rows, limit, replace=False)))
    rows = np.concatenate(keep)
    if len(rows) == len(labels):
        return candidate
    return Candidate(candidate.name, candidate.source, candidate.data.take(torch.as_tensor(np.sort(rows))))
