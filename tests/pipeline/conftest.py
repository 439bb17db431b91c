"""Fixtures the pipeline tests share: a folder laid out as the digits demo leaves it, keys and signed data, and a test
cycle's config (`cycle_config`). A trainguard command run in this process (`cli`) is in tests/conftest.py."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from digits_demo.demo import create_keys, sign_contributions, sign_trusted
from digits_demo.prepare import prepare_digits

REPO = Path(__file__).resolve().parents[2]

# What a test cycle changes in configs/<name>: every stage runs (bootstrap, detectors, RONI with its rate probe,
# adversarial training, robust accuracy, gate, signing, MLflow), each at a small statistical cost that still
# exercises it. RONI tests at level 0.02 with 199 draws, the fewest its union test can reject with there
# (draws + 1 >= 4 / level): at 0.1 (39 draws) a clean source was flagged in a scenario that needs it accepted,
# and clean shards stop drawing early, so only refused ones pay for the draws. Its copies fine-tune 5 steps, not
# 20 (checkpoints after 1, 2, 3 and 5): each copy costs a quarter, the rate probe picks the same rates on the
# digits cycles, and 30%-flipped shards still score past every clean draw (about 9-11 clean scales against at most
# 7) while the smallest clean shard p-value rose (0.02 to 0.07).
QUICK_CYCLE: dict[str, dict[str, Any]] = {
    "training": {"bootstrap_epochs": 15},
    "trainer": {"init_args": {"max_epochs": 2}},
    "roni": {"level": 0.02, "calibration_draws": 199, "options": {"steps": 5}},
    "robust_eval": {"subset_size": 50, "steps": 2},
    "gate": {"min_clean_accuracy": 0.5, "min_robust_accuracy": 0.0, "max_accuracy_drop": 0.2, "max_class_drop": 0.3},
}


# Every stage at its smallest cost and the gate open, for tests of what surrounds a cycle (DVC's view of it, where a
# project's modules come from), not of what it decides. RONI at level 0.2 takes 19 draws (draws + 1 >= 4 / level).
SMALLEST_CYCLE: dict[str, dict[str, Any]] = {
    "training": {"bootstrap_epochs": 2},
    "trainer": {"init_args": {"max_epochs": 2}},
    "roni": {"level": 0.2, "calibration_draws": 19, "options": {"steps": 5}},
    "adversarial": {"steps": 1},
    "robust_eval": {"subset_size": 50, "steps": 1},
    "gate": {"min_clean_accuracy": 0.0, "min_robust_accuracy": 0.0, "max_accuracy_drop": 1.0, "max_class_drop": 1.0},
}


def smallest_cycle(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with `SMALLEST_CYCLE` merged in."""
    return _merged(config, SMALLEST_CYCLE)


def quick_cycle(experiment: str, changes: dict[str, Any] | None = None, name: str = "digits.yaml") -> dict[str, Any]:
    """configs/`name` as a test cycle runs it (`QUICK_CYCLE`), logging to MLflow as `experiment` (also the
    registered model's name), with `changes` merged in (nested mappings key by key, anything else replaced)."""
    config = yaml.safe_load((REPO / "configs" / name).read_text())
    config["project"] = str(REPO / "examples")  # the digits example, wherever the config is written
    config["tracking"] = {"experiment_name": experiment, "registered_model_name": experiment}
    return _merged(_merged(config, QUICK_CYCLE), changes or {})


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    nested = {
        k: _merged(base[k], v) for k, v in changes.items() if isinstance(v, dict) and isinstance(base.get(k), dict)
    }
    return {**base, **changes, **nested}


@pytest.fixture(scope="session")
def cycle_config() -> Callable[..., dict[str, Any]]:
    """`cycle_config(experiment, changes=None, name="digits.yaml")`: a test cycle's config as data (`quick_cycle`)."""
    return quick_cycle


@dataclass(frozen=True)
class DigitsProject:
    """A folder laid out as the digits demo leaves it before signing: the trust policy, keys, prepared batch 0."""

    root: Path
    keys: Path
    data: Path
    contributed: dict[str, str]

    @classmethod
    def laid_out(cls, root: Path) -> DigitsProject:
        """The trust policy, fresh keys and batch 0 written under `root`, not yet signed."""
        (root / "configs").mkdir()
        shutil.copy(REPO / "configs" / "digits-trust.yaml", root / "configs")
        keys, data = root / "demo-work" / "keys", root / "demo-work" / "data"
        create_keys(keys)
        return cls(root, keys, data, prepare_digits(data).contributed())

    def sign(self) -> None:
        """The curator signs the trusted base and held-out set, the data owner the contributions."""
        sign_trusted(self.data, self.keys)
        sign_contributions(self.data, self.keys, self.contributed)


@pytest.fixture
def digits_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DigitsProject:
    """The digits layout in a fresh directory the test runs in (config paths are relative to it), not yet signed:
    a test may change the data first."""
    monkeypatch.chdir(tmp_path)
    return DigitsProject.laid_out(tmp_path)


@pytest.fixture
def workdir(digits_project: DigitsProject) -> Path:
    """A fresh directory to run cycles in, with keys and signed batch 0."""
    digits_project.sign()
    return digits_project.root
