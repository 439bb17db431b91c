"""Margin check: a source whose samples sit on the decision boundary is flagged; ordinary sources are not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from digits_demo.digits import load_digits_split
from torch import nn
from torch.nn import functional as F

from trainguard.defenses.errors import ScreeningInputError
from trainguard.defenses.margin import check_margins, compare_margins, sample_margins


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    digits = load_digits_split(seed=3)
    x, y = torch.tensor(digits.x), torch.tensor(digits.y)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(40):
        for idx in torch.randperm(600).split(64):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net, x[600:], y[600:]


def _boundary_points(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """Blends of two digits of different classes, slid along the segment to where the model is least sure."""
    a, b = x[:n], x[n : 2 * n][y[n : 2 * n] != y[:n]][:n]
    a = a[: len(b)]
    weights = torch.linspace(0, 1, 21)
    blends = torch.stack([(1 - w) * a + w * b for w in weights], dim=1)
    margins = torch.tensor(sample_margins(model, blends.reshape(-1, 64))).reshape(len(a), len(weights))
    return blends[torch.arange(len(a)), margins.argmin(1)]


def test_a_source_of_boundary_points_is_flagged_and_ordinary_sources_are_not(setup) -> None:
    model, x, y = setup
    near = _boundary_points(model, x[:200], y[:200], 40)
    rows = torch.cat([x[200:500], near])
    sources = ["alice"] * 100 + ["bob"] * 100 + ["carol"] * 100 + ["mallory"] * len(near)
    results = {r.source: r for r in check_margins(model, rows, sources)}
    assert results["mallory"].flagged
    assert "closer to the decision boundary" in results["mallory"].reason
    assert results["mallory"].median_margin < results["mallory"].population_median
    assert not any(results[s].flagged for s in ("alice", "bob", "carol"))


def test_a_source_with_a_few_hard_samples_is_not_flagged() -> None:
    rng = np.random.default_rng(0)
    margins = rng.uniform(0.5, 1.0, 400)
    margins[:3] = 0.01
    sources = ["a"] * 100 + ["b"] * 100 + ["c"] * 100 + ["d"] * 100
    assert not any(r.flagged for r in compare_margins(margins, sources))


def test_small_sources_are_reported_but_not_tested() -> None:
    margins = np.concatenate([np.full(5, 0.01), np.linspace(0.5, 1.0, 100)])
    results = {r.source: r for r in compare_margins(margins, ["tiny"] * 5 + ["big"] * 100)}
    assert not results["tiny"].flagged
    assert results["tiny"].reason == "too few samples to test"


def test_mismatched_source_labels_are_bad_input() -> None:
    with pytest.raises(ScreeningInputError):
        compare_margins(np.ones(3), ["a", "b"])
