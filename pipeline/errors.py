"""Errors of the retraining pipeline: one family under `TrainguardError`, a subclass per failure kind."""

from __future__ import annotations

from trainguard.errors import TrainguardError


class PipelineError(TrainguardError):
    """Base of every pipeline failure; `exit_code` is what the CLI exits with (1: a failed check)."""


class ConfigError(PipelineError):
    """A config file is missing, unparsable or invalid; `key` names the offending entry."""

    exit_code = 2

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ModelSignatureError(PipelineError):
    """A model's OpenSSF model-signing signature is missing, unreadable or does not match its files."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ModelIdentityError(ModelSignatureError):
    """A validly signed model that is not the one recorded for this use (an older release copied over it)."""

    reason = "model-mismatch"


class RegistryError(ModelSignatureError):
    """A registered version that is not the one asked for or not the one the registry recorded; `reason` names
    the check (champion-rollback, digest-mismatch, cycle-mismatch, not-trainguard, not-registered, model-ref)."""

    def __init__(self, where: str, reason: str, detail: str, *, exit_code: int = 1) -> None:
        super().__init__(f"{where}: {reason}: {detail}", path=where)
        self.reason = reason
        self.exit_code = exit_code


class ModelNotFoundError(ModelSignatureError):
    """The model directory or public key named does not exist (unusable input, not a failed check)."""

    exit_code = 2


class AttestationError(PipelineError):
    """A model attestation is unreadable, malformed or not signed by a trusted key."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class AttestationInputError(AttestationError):
    """The attestation or a trusted key file cannot be read (unusable input, not a failed check)."""

    exit_code = 2


class AttestationMismatchError(AttestationError):
    """A validly signed attestation names a different model than the one on disk (swapped or edited file)."""


class StateError(PipelineError):
    """The persisted cycle state is unreadable or malformed; it is never silently reset."""

    exit_code = 2

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class TamperedStateError(StateError):
    """The cycle state's signature does not verify, or its log does not hold what its head commits to: a failed
    check, not bad input."""

    exit_code = 1
    reason = "tampered-state"


class StaleStateError(TamperedStateError):
    """The cycle state is not the newest link of its signed history: its own log, or a signed receipt of a later
    cycle, holds more (an older or mid-cycle state put back, or a deleted one)."""

    reason = "stale-state"


class ForeignStateError(TamperedStateError):
    """The cycle state belongs to another pipeline (another config name or work folder, or another history of
    this one) that shares the cycle key."""

    reason = "foreign-state"


class CycleAbortedError(PipelineError):
    """A check stopped the retraining cycle before it had effect; `check` names it (verify, gate, ...)."""

    def __init__(self, message: str, check: str) -> None:
        super().__init__(message)
        self.check = check


class LaunchError(PipelineError):
    """This process was started in a way the cycle cannot run as: the batch step of a SLURM allocation of many
    tasks, tasks spread unevenly over the nodes, a launcher trainguard does not know, or GPUs a task cannot use.
    Exit code 2: how the job was started is the input to fix, no check failed."""

    exit_code = 2
    reason = "launch"


class PreflightError(PipelineError):
    """A check `trainguard check` (and the start of every cycle) runs before any training failed; `check` names it
    (keys, manifests, model, ...)."""

    def __init__(self, message: str, check: str) -> None:
        super().__init__(message)
        self.check = check
