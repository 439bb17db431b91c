"""The held-out set's seeded split between RONI's calibration and its impact rows."""

from __future__ import annotations

import torch

from trainguard.defenses.heldout import LabeledData
from trainguard.pipeline.holdout_split import split_holdout


def test_the_split_partitions_the_rows_and_keeps_each_rows_extra_inputs() -> None:
    rows = torch.arange(10)
    holdout = LabeledData(rows.float().unsqueeze(1), rows, {"mask": rows * 10})
    calibration, impacts = split_holdout(holdout, 0.3, seed=7)
    assert (len(calibration), len(impacts)) == (3, 7)
    assert sorted(torch.cat([calibration.y, impacts.y]).tolist()) == list(range(10))
    for part in (calibration, impacts):
        assert torch.equal(part.extras["mask"], part.y * 10) and torch.equal(part.x.squeeze(1), part.y.float())
    again, _ = split_holdout(holdout, 0.3, seed=7)
    assert torch.equal(again.y, calibration.y)
