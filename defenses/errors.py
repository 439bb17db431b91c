"""Errors of the training-time defenses: one base, a subclass per failure kind."""

from __future__ import annotations


class DefenseError(Exception):
    """Base of every defense failure; `exit_code` 1 = failed check, 2 = bad input."""

    exit_code = 1
