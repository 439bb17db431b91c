"""Errors of the retraining pipeline: one base, a subclass per failure kind."""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every pipeline failure; `exit_code` is what the CLI exits with (1: a failed check)."""

    exit_code = 1


class ConfigError(PipelineError):
    """A config file is missing, unparsable or invalid; `key` names the offending entry."""

    exit_code = 2

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key
