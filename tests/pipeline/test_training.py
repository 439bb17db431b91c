"""The cycle's training step builds its defenses for the config's task and trains with the configured method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from trainguard.defenses import TRADES, AdversarialTraining, ModelGate, RobustAccuracy
from trainguard.defenses.heldout import LabeledData
from trainguard.pipeline.config import load_config
from trainguard.pipeline.errors import ConfigError
from trainguard.pipeline.training import defense_callbacks, fitted_module, train, trainer
from trainguard.provenance.dataset import VerifiedDataModule
from trainguard.provenance.manifest_ref import ManifestRef

DIGITS = Path(__file__).resolve().parents[2] / "configs" / "digits.yaml"


def test_the_cycles_defenses_serve_the_configs_task() -> None:
    config = load_config(DIGITS)
    config = config.model_copy(update={"task": config.task.model_copy(update={"kind": "regression", "tolerance": 0.2})})
    callbacks = defense_callbacks(config, LabeledData(torch.rand(8, 64), torch.rand(8)), previous=None)
    assert {type(c) for c in callbacks} == {AdversarialTraining, RobustAccuracy, ModelGate}
    assert all(c.task.kind == "regression" and c.task.tolerance == 0.2 for c in callbacks)
    gate = next(c for c in callbacks if isinstance(c, ModelGate))
    assert gate.baseline == "incoming" and gate.num_classes is None


def test_trades_and_adversarial_training_take_the_same_attack_options_from_the_config() -> None:
    config = load_config(DIGITS)
    section = {"eps": 0.1, "steps": 3, "step_size": 0.02, "norm": "2", "bounds": (-1.0, 1.0)}
    built = []
    for attack in ("trades", "pgd"):
        adversarial = config.adversarial.model_copy(update={**section, "attack": attack})
        chosen = config.model_copy(update={"adversarial": adversarial})
        if attack == "trades":
            trades = fitted_module(chosen, chosen.model.instantiate())
            assert isinstance(trades, TRADES)
            built.append(trades.options)
        else:
            holdout = LabeledData(torch.rand(8, 64), torch.arange(8))
            callbacks = defense_callbacks(chosen, holdout, previous=None)
            built.append(next(c for c in callbacks if isinstance(c, AdversarialTraining)).options)
    fields = ("steps", "step_size", "norm", "bounds", "seed", "crafting_precision")
    assert [tuple(getattr(o, f) for f in fields) for o in built] == [(3, 0.02, "2", (-1.0, 1.0), 0, "trainer")] * 2
    assert built[0].task == built[1].task


def test_a_torchrun_launch_sizes_a_trainer_configured_for_one_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's torchrun line with the README's `devices: 1` config: the launch's size wins (Lightning refuses
    devices x nodes that differ from the world size), and the rank-0-alone fit stays on one device."""
    config = load_config(DIGITS)
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}
    for name, value in (torchrun | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}).items():
        monkeypatch.setenv(name, value)
    launched = trainer(config, [], None, max_epochs=1)
    assert (launched.num_devices, launched.num_nodes, launched.world_size) == (2, 1, 2)
    assert type(launched.strategy).__name__ == "DDPStrategy"
    alone = trainer(config, [], None, max_epochs=1, alone=True)
    assert (alone.num_devices, alone.world_size) == (1, 1)


def test_attack_trades_trains_the_cycles_model_on_the_trades_objective(workdir: Path) -> None:
    """`adversarial.attack: trades` runs TRADES through the cycle's training step: the loss trained on is TRADES'
    natural term plus beta times a positive divergence term, the gate and robust accuracy measure the wrapped
    model, and the result says what trained. (The held-out set is noise: the gate may keep the incoming weights.)"""
    document = yaml.safe_load(DIGITS.read_text())
    document["project"] = str(DIGITS.parents[1] / "examples")
    document["adversarial"] = {"attack": "trades", "eps": 0.1, "steps": 2, "trades_beta": 3.0}
    document["trainer"]["init_args"]["max_epochs"] = 1
    document["robust_eval"] = {"eps": [0.0, 0.1], "subset_size": 32, "steps": 2}
    path = workdir / "trades.yaml"
    path.write_text(yaml.safe_dump(document))
    config = load_config(path)
    trusted = workdir / "demo-work" / "data"
    spec = ManifestRef(trusted / "trusted.manifest.json", trusted / "trusted", dataset="digits-trusted")
    data = VerifiedDataModule([spec], config.dataset.trust, train_roles=("trusted",))
    holdout = LabeledData(torch.rand(64, 64, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 10)
    result = train(config.model.instantiate(), config, data, holdout, previous=None, logger=None)

    metrics = result.metrics
    assert result.adversarial == "trades"
    assert metrics["train/trades_robust"] > 0
    assert metrics["train/loss"] == pytest.approx(
        metrics["train/trades_natural"] + 3.0 * metrics["train/trades_robust"], rel=1e-4
    )
    assert "adv/eps" not in metrics, "AdversarialTraining does not also run"
    assert set(result.robust_accuracy) == {"0", "0.1"} and result.verdict is not None


def test_trades_refuses_the_options_it_has_no_use_for(tmp_path: Path) -> None:
    """ratio and warmup_epochs are AdversarialTraining's, trades_beta is TRADES': each with the other is refused."""
    document = yaml.safe_load(DIGITS.read_text())
    document["project"] = str(DIGITS.parents[1] / "examples")
    for section, key in (({"attack": "trades", "ratio": 0.5}, "ratio"), ({"attack": "pgd", "trades_beta": 1.0}, "")):
        document["adversarial"] = section
        path = tmp_path / "cycle.yaml"
        path.write_text(yaml.safe_dump(document))
        with pytest.raises(ConfigError) as caught:
            load_config(path, check_components=False)
        expected = f"adversarial.{key or 'trades_beta'}"
        assert caught.value.key == expected and f"{expected}: " in str(caught.value) and "\n" not in str(caught.value)
    document["adversarial"] = {"attack": "trades", "warmup_epochs": 1.0}
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError, match=r"adversarial\.warmup_epochs: AdversarialTraining's; TRADES has none"):
        load_config(path, check_components=False)
