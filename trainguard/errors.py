"""The root of every trainguard error, after python-tuf's `tuf.api.exceptions`: one base, a family per package
(`ProvenanceError`, `DefenseError`, `PipelineError`), a subclass per failure kind; `except TrainguardError` catches
all of them and `exit_code` is what the CLI exits with (1: a check failed, 2: the input is unusable)."""

from __future__ import annotations


class TrainguardError(Exception):
    """Base of every trainguard failure; `exit_code` 1 = failed check, 2 = bad input."""

    exit_code = 1
