"""`AttackOptions`: the attack settings the defenses' callbacks share, checked once.

`AdversarialTraining`, `RobustAccuracy`, `TRADES` and the `OverfittingGuard` each attack the model they train or
measure with the same knobs (steps, step size, norm, bounds, loss, task, where a batch keeps its inputs and targets,
the forward hook, the seed and the crafting precision). Each takes them as keyword arguments, as before, and builds
one `AttackOptions` from them, so every knob is checked here alone; eps stays each callback's own (a warm-up
schedule, several eps, one eps). `AdversarialTraining` hands its options to the guard it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from trainguard.defenses.attacks.base import LossFn, Norm, parse_norm
from trainguard.defenses.attacks.batches import BatchKeys, Key
from trainguard.defenses.attacks.bounds import Bound, check_bounds
from trainguard.defenses.attacks.precision import Crafting, crafting_autocast, parse_crafting
from trainguard.defenses.errors import AttackConfigError
from trainguard.defenses.forward import ModuleForward
from trainguard.defenses.task import Task, as_task

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from trainguard.defenses.forward import BatchForward


@dataclass(frozen=True, eq=False)
class AttackOptions:
    """`steps` iterations of `step_size` (None: 2.5 eps / steps) in the `norm` ball, clamped into the data's
    `bounds` (required); the attack maximises `loss` (None: the `task`'s); `input_key`/`target_key` locate the
    tensors of dict batches; `forward(module, batch, x)` gives the outputs (None: `module(x)`); random starts draw
    from `seed` (None: from torch's RNG); `crafting` is the precision attacks run at: `"trainer"` (the trainer's
    autocast) or `"fp32"`."""

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
    crafting: Crafting = "trainer"

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
        object.__setattr__(self, "crafting", parse_crafting(self.crafting))

    @classmethod
    def of(
        cls,
        *,
        steps: int = 10,
        step_size: float | None = None,
        norm: str | float = "inf",
        bounds: tuple[Bound, Bound] | None = (0.0, 1.0),
        loss: LossFn | None = None,
        task: Task | str | None = None,
        input_key: Key | None = None,
        target_key: Key | None = None,
        forward: ModuleForward | None = None,
        seed: int | None = None,
        crafting: str = "trainer",
    ) -> AttackOptions:
        """The options from keyword arguments as users write them (`"linf"`, a task's name, `bounds=None` refused
        in one line): `__post_init__` normalises them."""
        loose: Any = cls
        options: AttackOptions = loose(
            steps, step_size, norm, bounds, loss, task, input_key, target_key, forward, seed, crafting
        )
        return options

    @property
    def keys(self) -> BatchKeys:
        """Where a batch keeps its inputs and targets."""
        return BatchKeys(self.input_key, self.target_key)

    def keywords(self) -> dict[str, Any]:
        """The options as the callbacks' keyword arguments (to hand them on whole)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def attack_arguments(self, forward: BatchForward, trainer: pl.Trainer) -> dict[str, Any]:
        """What every attack a callback builds takes from the options, for `forward` in `trainer`'s run."""
        autocast = crafting_autocast(self.crafting, trainer)
        return {"norm": self.norm, "bounds": self.bounds, "task": self.task, "forward": forward, "autocast": autocast}


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
    def crafting(self) -> Crafting:
        return self.options.crafting
