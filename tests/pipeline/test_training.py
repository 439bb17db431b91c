"""The cycle's training step builds its defenses for the config's task."""

from __future__ import annotations

from pathlib import Path

import torch

from trainguard.defenses import AdversarialTraining, ModelGate, RobustAccuracy
from trainguard.defenses.heldout import LabeledData
from trainguard.pipeline.config import load_config
from trainguard.pipeline.training import defense_callbacks

DIGITS = Path(__file__).resolve().parents[2] / "configs" / "digits.yaml"


def test_the_cycles_defenses_serve_the_configs_task() -> None:
    config = load_config(DIGITS)
    config = config.model_copy(update={"task": config.task.model_copy(update={"kind": "regression", "tolerance": 0.2})})
    callbacks = defense_callbacks(config, LabeledData(torch.rand(8, 64), torch.rand(8)), previous=None)
    assert {type(c) for c in callbacks} == {AdversarialTraining, RobustAccuracy, ModelGate}
    assert all(c.task.kind == "regression" and c.task.tolerance == 0.2 for c in callbacks)
    gate = next(c for c in callbacks if isinstance(c, ModelGate))
    assert gate.baseline == "incoming" and gate.num_classes is None
