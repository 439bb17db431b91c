"""The robust_eval section: PGD alone by default, an APGD ensemble on request, refused up front when unusable."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from trainguard.defenses import RobustAccuracy
from trainguard.defenses.heldout import LabeledData
from trainguard.pipeline.config import parse_config
from trainguard.pipeline.errors import ConfigError
from trainguard.pipeline.training import defense_callbacks

DIGITS = Path(__file__).resolve().parents[2] / "configs" / "digits.yaml"
BASE: dict[str, Any] = yaml.safe_load(DIGITS.read_text())


def _config(robust_eval: dict[str, Any], labels: list[int] | None = None) -> Any:
    data = copy.deepcopy(BASE)
    data["robust_eval"].update(robust_eval)
    if labels is not None:
        data["validation"]["labels"] = labels
    return parse_config(data)


def _robust(config: Any) -> RobustAccuracy:
    holdout = LabeledData(torch.zeros(4, 64), torch.zeros(4, dtype=torch.long))
    return next(c for c in defense_callbacks(config, holdout, None) if isinstance(c, RobustAccuracy))


def test_the_default_stays_pgd_alone_with_the_metric_names_the_gate_reads() -> None:
    robust = _robust(_config({}))
    assert robust.attack_names == ("pgd",) and robust.restarts == 1
    assert robust.metric_names() == ["val/robust_acc_eps0", "val/robust_acc_eps0.05", "val/robust_acc_eps0.1"]
    assert robust.attack_metric_names() == {}


def test_an_apgd_ensemble_with_restarts_reaches_the_callback() -> None:
    robust = _robust(_config({"attacks": ["pgd", "apgd-ce", "apgd-dlr"], "restarts": 3, "steps": 50}))
    assert robust.attack_names == ("pgd", "apgd-ce", "apgd-dlr") and robust.restarts == 3 and robust.steps == 50
    assert robust.metric_names() == ["val/robust_acc_eps0", "val/robust_acc_eps0.05", "val/robust_acc_eps0.1"]
    assert robust.attack_metric_names()["apgd-dlr"][-1] == "val/robust_acc_eps0.1/apgd-dlr"


@pytest.mark.parametrize("preset", ["autoattack-fast", "autoattack"])
def test_a_preset_reaches_the_callback_as_a_cascade_at_autoattacks_100_steps(preset) -> None:
    config = _config({"attacks": preset, "steps": None})  # digits.yaml sets steps: 5
    assert config.robust_eval.attacks == preset
    robust = _robust(config)
    assert robust.preset == preset and robust.steps == 100 and robust.large_eps_check
    assert robust.attack_names == (
        ("apgd-ce", "apgd-t", "fab-t", "square") if preset == "autoattack" else robust.attack_names
    )
    assert robust.attack_metric_names()["apgd-t"][-1] == "val/robust_acc_eps0.1/broken_by/apgd-t"
    assert robust.metric_names()[-1] == "val/robust_acc_eps0.1", "the gate's floor reads the cascade's worst case"


def test_apgd_t_can_join_an_attack_list_and_steps_stay_as_configured() -> None:
    robust = _robust(_config({"attacks": ["pgd", "apgd-t"], "steps": 20}))
    assert robust.attack_names == ("pgd", "apgd-t") and robust.steps == 20 and robust.preset is None


@pytest.mark.parametrize(
    "robust_eval,labels,match",
    [
        ({"attacks": ["cw"]}, None, "robust_eval.attacks: Input should be .pgd."),
        ({"attacks": []}, None, "robust_eval.attacks"),
        ({"attacks": ["apgd-ce", "apgd-ce"]}, None, "duplicates"),
        ({"restarts": 0}, None, "robust_eval.restarts"),
        ({"attacks": ["pgd", "apgd-dlr"]}, [0, 1], "apgd-dlr needs 3 or more classes"),
        ({"attacks": "autoattack-fast"}, [0, 1, 2], "apgd-t needs 4 or more classes"),
        ({"attacks": ["apgd-t"]}, [0, 1, 2], "apgd-t needs 4 or more classes"),
        ({"attacks": "autoattack-slow"}, None, "robust_eval.attacks"),
    ],
)
def test_unusable_robust_eval_settings_are_refused_before_anything_runs(robust_eval, labels, match) -> None:
    with pytest.raises(ConfigError, match=match):
        _config(robust_eval, labels)
