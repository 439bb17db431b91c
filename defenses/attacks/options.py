"""`AttackOptions`: the attack settings the defenses' callbacks share, checked once.

`AdversarialTraining`, `RobustAccuracy`, `TRADES` and the `OverfittingGuard` each attack the model they train or
measure with the same settings (steps, step size, norm, bounds, loss, task, where a batch keeps its inputs and targets,
the forward hook, the seed and the crafting precision). Each takes them either as one `AttackOptions` (`options=`:
checked once, shareable between callbacks) or as its keyword arguments (`AttackOptionKeywords`, listed here alone),
from which it builds one with its own defaults (`AttackOptions.given`). eps stays each callback's own (a warm-up
schedule, several eps, one eps). `AdversarialTraining` hands its options to the guard it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

from typing_extensions import Unpack

from trainguard.defenses.attacks.base import LossFn, Norm, parse_norm
from trainguard.defenses.attacks.batches import BatchKeys, Key
from trainguard.defenses.attacks.bounds import Bound, check_bounds
from trainguard.defenses.attacks.precision import (
    CraftingPrecision,
    parse_crafting_precision,
    resolve_crafting_precision,
)
from trainguard.defenses.errors import AttackConfigError
from trainguard.defenses.forward import ModuleForward
from trainguard.defenses.task import Task, as_task

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from trainguard.defenses.forward import BatchForward


class AttackOptionKeywords(TypedDict, total=False):
    """The fields of `AttackOptions` as keyword arguments, in the forms users write them (`"linf"`, a task's name,
    `bounds=None`, which is refused in one line, `steps=None` for the callback's default): what the attacking
    callbacks take as `**settings`."""

    steps: int | None
    step_size: float | None
    norm: str | float
    bounds: tuple[Bound, Bound] | None
    loss: LossFn | None
    task: Task | str | None
    input_key: Key | None
    target_key: Key | None
    forward: ModuleForward | None
    seed: int | None
    crafting_precision: str


@dataclass(frozen=True, eq=False)
class AttackOptions:
    """The settings every attack a callback builds shares, normalised and checked when made.

    Args:
        steps: Iterations of each attack (>= 1).
        step_size: Each step's size; None: 2.5 eps / steps.
        norm: The threat model's ball: `"inf"` (also `"linf"`, `float("inf")`) or `"2"` (also `"l2"`, 2).
        bounds: The data's value range `(lower, upper)`: numbers or per-feature tensors; attacks clamp into it.
        loss: `loss(outputs, target)` the attack maximises; None: the task's.
        task: A `Task` or `"classification"`, `"multilabel"`, `"regression"`: the loss and what counts as correct.
        input_key: Where a dict batch keeps its inputs (tuples and lists: position 0).
        target_key: Where a dict batch keeps its targets (tuples and lists: position 1).
        forward: `forward(module, batch, x)` gives the outputs for inputs `x`; None: `module(x)`.
        seed: Random starts draw from it; None: from torch's RNG.
        crafting_precision: `"trainer"` (the autocast of the trainer's precision) or `"fp32"`.

    Raises:
        AttackConfigError: An option out of range (steps < 1, step_size <= 0, an unknown norm or crafting
            precision, bounds None or not ordered), in one line.
        TaskMismatchError: An unknown task name.

    Example::

        options = AttackOptions.of(steps=7, bounds=(-1.0, 1.0), task="classification", crafting_precision="fp32")
        callbacks = [AdversarialTraining("pgd", eps=0.1, options=options), RobustAccuracy(eps=(0.1,), options=options)]
    """

    steps: int = 10
    step_size: float | None = None
    norm: Norm = "inf"
    bounds: tuple[Bound, Bound] = (0.0, 1.0)
    loss: LossFn | None = None
    task: Task = field(default_factory=Task)
    input_key: Key | None = None
    target_key: Key | None = None
    forward: ModuleForward | None = None
    seed: int | None = None
    crafting_precision: CraftingPrecision = "trainer"

    def __post_init__(self) -> None:
        try:
            whole = not isinstance(self.steps, bool) and int(self.steps) == self.steps >= 1
        except (TypeError, ValueError, OverflowError):
            whole = False
        if not whole:
            raise AttackConfigError(f"steps must be an integer >= 1, got {self.steps!r}")
        object.__setattr__(self, "steps", int(self.steps))
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size > 0):
            raise AttackConfigError(f"step_size must be a finite number > 0 or None, got {self.step_size!r}")
        object.__setattr__(self, "norm", parse_norm(self.norm))
        object.__setattr__(self, "bounds", check_bounds(self.bounds))
        object.__setattr__(self, "task", as_task(self.task))
        object.__setattr__(self, "crafting_precision", parse_crafting_precision(self.crafting_precision))

    @classmethod
    def of(cls, **keywords: Unpack[AttackOptionKeywords]) -> AttackOptions:
        """The options from keyword arguments as users write them; `__post_init__` normalises them. A keyword that
        is no attack setting raises TypeError, as an unknown keyword argument does."""
        unknown = [name for name in keywords if name not in AttackOptionKeywords.__annotations__]
        if unknown:
            raise TypeError(
                f"unexpected keyword argument {', '.join(map(repr, unknown))}: the attack settings are "
                f"{', '.join(AttackOptionKeywords.__annotations__)}"
            )
        loose: Any = cls
        options: AttackOptions = loose(**_stated(keywords))
        return options

    @classmethod
    def given(
        cls,
        options: AttackOptions | None,
        keywords: AttackOptionKeywords,
        **defaults: Unpack[AttackOptionKeywords],
    ) -> AttackOptions:
        """A callback's options: `options` as passed, or built from its attack `keywords` over the callback's own
        `defaults`; both at once raise AttackConfigError (one would silently override the other)."""
        if options is None:
            merged = _stated(defaults)
            merged.update(_stated(keywords))
            return cls.of(**merged)
        stated = _stated(keywords)
        if stated:
            given = ", ".join(name for name in AttackOptionKeywords.__annotations__ if name in stated)
            raise AttackConfigError(
                f"pass the attack settings as options= or as keywords, not both: got options= and {given}"
            )
        if not isinstance(options, AttackOptions):
            raise AttackConfigError(f"options must be an AttackOptions, got {type(options).__name__}")
        return options

    @property
    def keys(self) -> BatchKeys:
        """Where a batch keeps its inputs and targets."""
        return BatchKeys(self.input_key, self.target_key)

    def attack_arguments(self, forward: BatchForward, trainer: pl.Trainer) -> dict[str, Any]:
        """What every attack a callback builds takes from the options, for `forward` in `trainer`'s run."""
        return {
            "norm": self.norm,
            "bounds": self.bounds,
            "task": self.task,
            "forward": forward,
            "crafting_precision": resolve_crafting_precision(self.crafting_precision, trainer),
        }


def _stated(keywords: AttackOptionKeywords) -> AttackOptionKeywords:
    """`keywords` without a `steps=None`, which stands for the default steps."""
    stated = keywords.copy()
    if "steps" in stated and stated["steps"] is None:
        del stated["steps"]
    return stated


class AttackSettings:
    """A callback's shared attack settings (`options`), readable under the keyword names they were passed as."""

    options: AttackOptions

    @property
    def steps(self) -> int:
        return self.options.steps

    @property
    def step_size(self) -> float | None:
        return self.options.step_size

    @property
    def norm(self) -> Norm:
        return self.options.norm

    @property
    def bounds(self) -> tuple[Bound, Bound]:
        return self.options.bounds

    @property
    def loss(self) -> LossFn | None:
        return self.options.loss

    @property
    def task(self) -> Task:
        return self.options.task

    @property
    def keys(self) -> BatchKeys:
        return self.options.keys

    @property
    def forward(self) -> ModuleForward | None:
        return self.options.forward

    @property
    def seed(self) -> int | None:
        return self.options.seed

    @property
    def crafting_precision(self) -> CraftingPrecision:
        return self.options.crafting_precision
