"""Shared by the defenses tests: an ordinary classifier that knows nothing of the defenses applied to it."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F


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
