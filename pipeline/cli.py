"""The `trainguard` command line: one sub-command per job, one-line errors, exit 2 bad input / 1 failed check.

Commands that do not train must not import torch or Lightning: each command module imports them lazily.
"""

from __future__ import annotations

import os
import sys

# typer imports pydantic, whose plugin loader scans every installed distribution's entry points (~60 ms of each
# start). trainguard uses no pydantic plugin; a user who does can set this variable to a plugin list.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

import typer

from pipeline.commands import register_all

app = typer.Typer(
    name="trainguard",
    help="Defense in depth for ML training pipelines: signed data shards, adversarial training, RONI checks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class _State:
    verbose = False


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"trainguard {version('trainguard')}")
        raise typer.Exit()


@app.callback()
def root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show details (tracebacks) on errors."),
    _version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """trainguard: sign and verify training data, train adversarially, screen for poisoning."""
    _State.verbose = verbose


register_all(app)


def _exit_code(error: BaseException) -> int | None:
    """The exit code for a project error (its `exit_code`), 2 for unusable input, None if not ours."""
    from pipeline.commands import project_errors

    if isinstance(error, project_errors()):
        return int(getattr(error, "exit_code", 1))
    if isinstance(error, (FileNotFoundError, IsADirectoryError, PermissionError, UnicodeDecodeError)):
        return 2
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point: usage errors exit 2 (click's convention); project errors print one line and exit 1 or 2."""
    try:
        app(args=argv, prog_name="trainguard")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except Exception as error:
        code = _exit_code(error)
        if code is None or _State.verbose:
            raise
        typer.echo(f"trainguard: error: {error}", err=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
