"""Shared by the defenses tests: an ordinary classifier that knows nothing of the defenses applied to it, digits
scenarios (a BadNets backdoor, flipped labels, clean data) for the row-level detectors, and a two-candidate
screening report (for the local record and its tracking)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from trainguard.defenses.conformal import Standardizer
from trainguard.defenses.roni import (
    Calibration,
    CandidateDecision,
    ScreeningConfig,
    ScreeningReport,
    SourceDecision,
    Stratum,
)


class Classifier(pl.LightningModule):
    """A small MLP over 64 digit pixels that logs its own validation accuracy."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean(), on_epoch=True, batch_size=len(y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.fixture
def classifier() -> type[Classifier]:
    """The classifier class, to build as many fresh (identically seeded) modules as a test needs."""
    return Classifier


@dataclass(frozen=True)
class DetectionScenario:
    """Digits rows for the row-level detectors: penultimate features of a small CNN, labels, sources (clean
    reference rows first, then `alice`, `bob` and `mallory`), which rows were poisoned, and the model's
    probabilities."""

    features: np.ndarray
    labels: np.ndarray
    sources: np.ndarray
    poisoned: np.ndarray
    pred_probs: np.ndarray

    def rate(self, rows: Sequence[int], poisoned: bool) -> float:
        """The share of the poisoned (or clean candidate) rows among `rows`."""
        wanted = (self.poisoned == poisoned) & (self.sources != REFERENCE)
        return float(wanted[list(rows)].sum() / wanted.sum())


REFERENCE = "<reference>"
TARGET = 0


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    return (bunch.data[order] / 16.0).astype(np.float32), bunch.target[order].astype(np.int64)


def _fit(x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(targets), generator=generator)
        for start in range(0, len(targets), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            F.cross_entropy(net(inputs[batch]), targets[batch]).backward()
            optimizer.step()
    return net.eval()


def _scenario(net: nn.Module, x: np.ndarray, y: np.ndarray, sources: np.ndarray, poisoned: np.ndarray):
    from trainguard.defenses.features import head_features, split_head

    (features,) = head_features(net, split_head(net), [torch.from_numpy(x)])
    with torch.no_grad():
        probabilities = torch.softmax(net(torch.from_numpy(x)), dim=1).numpy()
    return DetectionScenario(features.numpy(), y, sources, poisoned, probabilities)


def _sources(rows: int, reference: int) -> np.ndarray:
    third = (rows - reference) // 3
    return np.array(
        [REFERENCE] * reference + ["alice"] * third + ["bob"] * third + ["mallory"] * (rows - reference - 2 * third),
        dtype=object,
    )


def backdoor_scenario(poison_share: float) -> DetectionScenario:
    """BadNets (Gu et al. 2017): `mallory` stamps a 2x2 white patch on rows of other classes, as many as
    `poison_share` of the target class, and labels them `TARGET`; the CNN trains 8 epochs on all candidate rows,
    poison included (the papers' setting); 300 clean reference rows are never trained on."""
    x, y = _digits()
    y = y.copy()
    sources = _sources(len(y), 300)
    rng = np.random.default_rng(1)
    eligible = np.flatnonzero((sources == "mallory") & (y != TARGET))
    count = round(poison_share * (y[300:] == TARGET).sum())
    rows = rng.choice(eligible, size=count, replace=False)
    images = x.reshape(-1, 8, 8).copy()
    images[rows, 6:, 6:] = 1.0
    x, y[rows] = images.reshape(-1, 64), TARGET
    poisoned = np.zeros(len(y), dtype=bool)
    poisoned[rows] = True
    return _scenario(_fit(x[300:], y[300:], epochs=8), x, y, sources, poisoned)


def flipped_scenario(flip_share: float) -> DetectionScenario:
    """`mallory` relabels `flip_share` of its rows to another random class; the CNN is the curator's, trained on
    400 trusted rows only (as a cycle's incoming model), so every other row is out-of-sample."""
    x, y = _digits()
    net = _fit(x[300:700], y[300:700], epochs=20)
    keep = np.r_[0:300, 700 : len(y)]
    x, y = x[keep], y[keep].copy()
    sources = _sources(len(y), 300)
    rng = np.random.default_rng(2)
    mallory = np.flatnonzero(sources == "mallory")
    rows = rng.choice(mallory, size=round(flip_share * len(mallory)), replace=False)
    y[rows] = (y[rows] + rng.integers(1, 10, size=len(rows))) % 10
    poisoned = np.zeros(len(y), dtype=bool)
    poisoned[rows] = True
    return _scenario(net, x, y, sources, poisoned)


@pytest.fixture(scope="session")
def backdoored_digits() -> DetectionScenario:
    return backdoor_scenario(0.1)


@pytest.fixture(scope="session")
def clean_digits() -> DetectionScenario:
    return backdoor_scenario(0.0)


@pytest.fixture(scope="session")
def flipped_digits() -> DetectionScenario:
    return flipped_scenario(0.2)


def screening_report() -> ScreeningReport:
    """alice's shard accepted (p 0.5), mallory's rejected (p 0.002), alice not flagged; one 50-row stratum."""

    def decision(name: str, source: str, impact: float, p: float, accepted: bool) -> CandidateDecision:
        reason = "p-value above level" if accepted else f"p-value {p} <= level 0.01: held-out margin pushed down"
        return CandidateDecision(
            name, source, 50, impact, (impact, math.nan), impact / 0.01, p, None, p, 50, accepted, reason
        )

    counts = (25, 25, *[0] * 8)
    calibration = Stratum(50, counts, Standardizer((0.0, 0.0), (0.01, 0.01)), (0.1, 0.5, 2.0), (0.0, 0.01, 0.02))
    alice = SourceDecision("alice", ("shard-a",), 50, None, None, 0.4, 3, 0.4, 0.8, False, "source alice not flagged")
    return ScreeningReport(
        decisions=(decision("shard-a", "alice", 0.01, 0.5, True), decision("shard-m", "mallory", 0.2, 0.002, False)),
        sources=(alice,),
        calibration=Calibration(0.5, 128, "full", strata=(calibration,)),
        config=ScreeningConfig(),
        seconds=0.1,
        base_soft_accuracy=0.9,
        head=None,
    )
