"""The held-out set's split between RONI's calibration and the rows it measures impacts on."""

from __future__ import annotations

import torch

from trainguard.defenses.heldout import LabeledData


def split_holdout(holdout: LabeledData, fraction: float, seed: int) -> tuple[LabeledData, LabeledData]:
    """A seeded `fraction` of the held-out rows for RONI's calibration, the rest to measure impacts on (the model's
    extra inputs split with their rows)."""
    order = torch.randperm(len(holdout), generator=torch.Generator().manual_seed(seed))
    cut = round(fraction * len(holdout))
    return holdout.take(order[:cut]), holdout.take(order[cut:])
