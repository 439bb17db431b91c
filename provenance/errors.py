"""Errors of data provenance, after python-tuf's exceptions: one base, a subclass per failure kind."""

from __future__ import annotations


class ProvenanceError(Exception):
    """Base of every provenance failure. `reason` is a stable code; `exit_code` 1 = failed check, 2 = bad input."""

    reason = "provenance"
    exit_code = 1
