"""Errors of the training-time defenses: one family under `TrainguardError`, a subclass per failure kind."""

from __future__ import annotations

from trainguard.errors import TrainguardError


class DefenseError(TrainguardError):
    """Base of every defense failure; `exit_code` 1 = failed check, 2 = bad input."""


class AttackConfigError(DefenseError):
    """An attack or adversarial-training callback was configured with unusable values (eps, norm, bounds...)."""

    exit_code = 2


class AttackInputError(DefenseError):
    """A batch cannot be attacked as given: non-float inputs, values outside the bounds, mismatched bound shapes."""

    exit_code = 2


class TooFewClassesError(AttackConfigError):
    """An attack's loss needs more classes than the model outputs (the DLR loss needs 3); `classes` is how many."""

    def __init__(self, message: str, *, classes: int | None = None) -> None:
        super().__init__(message)
        self.classes = classes


class BatchFormatError(DefenseError):
    """A training or validation batch does not have the layout the callback was told to expect (keys, indices)."""

    exit_code = 2

    def __init__(self, message: str, *, key: object = None) -> None:
        super().__init__(message)
        self.key = key


class TaskMismatchError(DefenseError):
    """A model's outputs or a batch's targets do not fit the defense's task, or the defense cannot serve that task;
    `task` names it."""

    exit_code = 2

    def __init__(self, message: str, *, task: str | None = None) -> None:
        super().__init__(message)
        self.task = task


class ScreeningInputError(DefenseError):
    """RONI screening cannot run on what it was given (no candidates, empty held-out set, bad config)."""

    exit_code = 2


class ModelRejectedError(DefenseError):
    """The model gate rejected a fitted model: its held-out metrics dropped below its baseline; the weights of fit
    start were restored."""


class QuarantinedShardError(DefenseError):
    """A shard failed input validation and was quarantined; `shard` and `source` name it, `check` the failed rule."""

    def __init__(self, message: str, shard: str | None = None, source: str | None = None, check: str | None = None):
        super().__init__(message)
        self.shard = shard
        self.source = source
        self.check = check


class SourceCapError(DefenseError):
    """A source contributes more than its allowed fraction of a cycle's training data; `source` names it."""

    def __init__(self, message: str, source: str | None = None) -> None:
        super().__init__(message)
        self.source = source


class DetectionInputError(DefenseError):
    """A row-level detector cannot run on what it was given (shapes, no reference rows, bad config)."""

    exit_code = 2
