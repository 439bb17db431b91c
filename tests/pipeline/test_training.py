"""The cycle's training step builds its defenses for the config's task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainguard.defenses import AdversarialTraining, ModelGate, RobustAccuracy
from trainguard.defenses.heldout import LabeledData
from trainguard.pipeline.config import load_config
from trainguard.pipeline.training import defense_callbacks, trainer

DIGITS = Path(__file__).resolve().parents[2] / "configs" / "digits.yaml"


def test_the_cycles_defenses_serve_the_configs_task() -> None:
    config = load_config(DIGITS)
    config = config.model_copy(update={"task": config.task.model_copy(update={"kind": "regression", "tolerance": 0.2})})
    callbacks = defense_callbacks(config, LabeledData(torch.rand(8, 64), torch.rand(8)), previous=None)
    assert {type(c) for c in callbacks} == {AdversarialTraining, RobustAccuracy, ModelGate}
    assert all(c.task.kind == "regression" and c.task.tolerance == 0.2 for c in callbacks)
    gate = next(c for c in callbacks if isinstance(c, ModelGate))
    assert gate.baseline == "incoming" and gate.num_classes is None


def test_a_torchrun_launch_sizes_a_trainer_configured_for_one_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's torchrun line with the README's `devices: 1` config: the launch's size wins (Lightning refuses
    devices x nodes that differ from the world size), and the rank-0-alone fit stays on one device."""
    config = load_config(DIGITS)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    launched = trainer(config, [], None, max_epochs=1)
    assert (launched.num_devices, launched.num_nodes, launched.world_size) == (2, 1, 2)
    assert type(launched.strategy).__name__ == "DDPStrategy"
    alone = trainer(config, [], None, max_epochs=1, alone=True)
    assert (alone.num_devices, alone.world_size) == (1, 1)
