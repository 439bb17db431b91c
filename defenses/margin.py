"""Margin check: flags sources whose samples sit consistently closer to the decision boundary than the population.

A sample's margin is the gap between the model's top two class probabilities. Each source's margins are compared
with those of all other sources by a one-sided Mann-Whitney U test (Bonferroni-corrected over sources), so a source
is flagged only when its samples are closer as a whole, not because of a few hard ones. Margins need class
probabilities: other tasks are refused up front.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import mannwhitneyu
from torch import nn

from trainguard.defenses.errors import ScreeningInputError
from trainguard.defenses.task import Task, as_task


@dataclass(frozen=True)
class SourceMargin:
    """One source's margins against the other sources' and whether it is flagged for review."""

    source: str
    count: int
    median_margin: float
    population_median: float
    p_value: float
    flagged: bool
    reason: str


@torch.no_grad()
def sample_margins(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> np.ndarray:
    """Top-1 minus top-2 class probability per row, with `model` in eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        probs = torch.cat(
            [model(x[i : i + batch_size].to(device)).softmax(-1).cpu() for i in range(0, len(x), batch_size)]
        )
    finally:
        model.train(was_training)
    top = probs.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).double().numpy()


def compare_margins(
    margins: np.ndarray, sources: Sequence[str], alpha: float = 0.01, min_samples: int = 10
) -> tuple[SourceMargin, ...]:
    """Per source: its median margin against the rest, and whether it is flagged for review.

    Sources with fewer than `min_samples` rows are not tested (reported, never flagged).

    Args:
        margins: One margin per row (top-1 minus top-2 class probability).
        sources: The source of each row.
        alpha: The level of the one-sided Mann-Whitney U test, Bonferroni-corrected over the sources.
        min_samples: Fewest rows a source (and the rest) needs to be tested.

    Returns:
        One result per source, in first-seen order.

    Raises:
        ScreeningInputError: `margins` and `sources` differ in length.
    """
    labels = np.asarray(sources)
    if len(labels) != len(margins):
        raise ScreeningInputError(f"{len(margins)} margins but {len(labels)} source labels")
    names = list(dict.fromkeys(labels.tolist()))
    results = []
    for source in names:
        mine, rest = margins[labels == source], margins[labels != source]
        median, population = float(np.median(mine)), float(np.median(rest)) if len(rest) else float("nan")
        if len(mine) < min_samples or len(rest) < min_samples:
            results.append(SourceMargin(source, len(mine), median, population, 1.0, False, "too few samples to test"))
            continue
        p = float(mannwhitneyu(mine, rest, alternative="less").pvalue)
        flagged = p * len(names) < alpha
        reason = (
            f"source {source}: samples closer to the decision boundary than the population "
            f"(median margin {median:.3f} vs {population:.3f}, p={p:.2g})"
            if flagged
            else "margins in line with the population"
        )
        results.append(SourceMargin(source, len(mine), median, population, p, flagged, reason))
    return tuple(results)


def check_margins(
    model: nn.Module,
    x: torch.Tensor,
    sources: Sequence[str],
    alpha: float = 0.01,
    min_samples: int = 10,
    *,
    task: Task | str | None = None,
) -> tuple[SourceMargin, ...]:
    """`compare_margins` on the margins `model` gives to the rows `x`, each tagged with its source (classification
    only: a decision-boundary margin needs class probabilities).

    Args:
        model: The classifier, run in eval mode (its mode is restored).
        x: The rows' inputs.
        sources: The source of each row.
        alpha: The level of each source's test, Bonferroni-corrected over the sources.
        min_samples: Fewest rows a source (and the rest) needs to be tested.
        task: The task; anything but classification is refused.

    Returns:
        One result per source, in first-seen order.

    Raises:
        TaskMismatchError: A task other than classification.
        ScreeningInputError: `x` and `sources` differ in length.
    """
    as_task(task).refuse_unless(("classification",), "the margin check")
    return compare_margins(sample_margins(model, x), sources, alpha, min_samples)
