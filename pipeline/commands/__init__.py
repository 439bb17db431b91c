"""Sub-commands of the `trainguard` CLI, one module per area; each imports heavy libraries lazily."""

from __future__ import annotations

import typer


def register_all(app: typer.Typer) -> None:
    """Adds every sub-command to the root app."""
    from pipeline.commands import cycle, data, demo, model, prepare

    for module in (demo, prepare, data, cycle, model):
        module.register(app)


def project_errors() -> tuple[type[Exception], ...]:
    """The base error of every trainguard package, for the CLI's exit-code mapping."""
    from pipeline.errors import PipelineError

    errors: list[type[Exception]] = [PipelineError]
    from provenance.errors import ProvenanceError

    errors.append(ProvenanceError)
    from defenses.errors import DefenseError

    errors.append(DefenseError)
    return tuple(errors)
