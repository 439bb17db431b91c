"""One attack-options type: the four callbacks that attack check the same knobs in one place and say so alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from torch import nn

from trainguard.defenses import TRADES, AdversarialTraining, RobustAccuracy
from trainguard.defenses.attacks import AttackOptions
from trainguard.defenses.errors import DefenseError
from trainguard.defenses.overfitting import OverfittingGuard

BUILDERS: dict[str, Callable[..., Any]] = {
    "AdversarialTraining": lambda **kw: AdversarialTraining("pgd", eps=0.1, ratio=0.5, **kw),
    "RobustAccuracy": lambda **kw: RobustAccuracy((0.1,), **kw),
    "TRADES": lambda **kw: TRADES(nn.Linear(4, 2), eps=0.1, **kw),  # type: ignore[arg-type]
    "OverfittingGuard": lambda **kw: OverfittingGuard(eps=0.1, **kw),
}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"step_size": -0.1}, "step_size must be a finite number > 0 or None, got -0.1"),
        ({"norm": "l3"}, "norm must be 'inf' or '2', got 'l3'"),
        ({"bounds": None}, "bounds=None: attacks need the data's value range"),
        ({"crafting_precision": "fp16"}, "crafting_precision must be 'trainer' or 'fp32', got 'fp16'"),
        ({"task": "ranking"}, "unknown task 'ranking'"),
    ],
)
def test_every_attacking_callback_refuses_a_bad_option_with_the_same_one_line(bad: dict, message: str) -> None:
    for name, build in BUILDERS.items():
        with pytest.raises(DefenseError) as refused:
            build(**bad)
        assert message in str(refused.value) and "\n" not in str(refused.value), name


def test_the_callbacks_keep_their_keywords_as_one_normalised_options_value() -> None:
    settings = {"steps": 3, "norm": "linf", "bounds": (-1.0, 1.0), "task": "regression", "crafting_precision": "fp32"}
    for name, build in BUILDERS.items():
        options = build(**settings).options
        assert isinstance(options, AttackOptions), name
        assert (options.steps, options.norm, options.bounds, options.crafting_precision) == (
            3,
            "inf",
            (-1.0, 1.0),
            "fp32",
        )
        assert options.task.kind == "regression", name


def test_the_guard_adversarial_training_runs_shares_its_options() -> None:
    callback = AdversarialTraining(
        "fgsm-rs", eps=0.1, ratio=0.5, norm="2", bounds=(-1.0, 1.0), task="regression", guard_steps=7, seed=None
    )
    guard = callback.guard
    assert guard is not None
    assert (guard.steps, guard.step_size, guard.seed) == (7, None, 0)
    assert (guard.norm, guard.bounds, guard.crafting_precision) == (
        callback.norm,
        callback.bounds,
        callback.crafting_precision,
    )
    assert guard.task is callback.task, "the same Task, not one parsed again"


@pytest.mark.parametrize("name", BUILDERS)
def test_one_options_value_is_shared_whole_by_every_attacking_callback(name: str) -> None:
    options = AttackOptions.of(steps=3, norm="l2", bounds=(-1.0, 1.0), task="regression", crafting_precision="fp32")
    assert BUILDERS[name](options=options).options is options


@pytest.mark.parametrize("name", BUILDERS)
def test_options_and_attack_keywords_together_are_refused_naming_the_keywords(name: str) -> None:
    with pytest.raises(DefenseError, match="options= or as keywords, not both: got options= and steps, seed"):
        BUILDERS[name](options=AttackOptions.of(steps=3), steps=4, seed=1)


@pytest.mark.parametrize("name", BUILDERS)
def test_a_keyword_that_is_no_attack_setting_is_a_type_error_listing_the_settings(name: str) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'stepz': the attack settings are steps, "):
        BUILDERS[name](stepz=3)


def test_each_callback_keeps_its_own_defaults_for_the_settings_left_out() -> None:
    adversarial, guard, robust = (
        AdversarialTraining("pgd", eps=0.1, ratio=0.5),
        OverfittingGuard(eps=0.1),
        RobustAccuracy(),
    )
    assert (adversarial.steps, adversarial.seed) == (10, None)
    assert (guard.steps, guard.seed) == (5, 0)
    assert (robust.steps, robust.seed) == (10, 0)
    assert RobustAccuracy(attacks="autoattack-fast").steps == 100
    assert RobustAccuracy(attacks="autoattack-fast", steps=7).steps == 7
    assert RobustAccuracy(attacks="autoattack-fast", steps=None).steps == 100, "steps=None: the callback's default"


def test_trades_refuses_a_loss_it_would_not_maximise() -> None:
    with pytest.raises(DefenseError, match="TRADES maximises the divergence from the clean outputs: it takes no loss"):
        TRADES(nn.Linear(4, 2), eps=0.1, loss=lambda outputs, target: outputs.sum())  # type: ignore[arg-type]
