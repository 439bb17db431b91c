"""The `trainguard` command line: one sub-command per job, one-line errors, exit 2 bad input / 1 failed check.

Commands that do not train must not import torch or Lightning: each command module imports them lazily. The CLI is
plain click, which starts in ~20 ms: `trainguard verify`'s wall time includes start-up.
"""

from __future__ import annotations

import sys

import click

from trainguard.errors import TrainguardError
from trainguard.pipeline.commands import register_all


class _State:
    verbose = False


@click.group(
    name="trainguard",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--verbose", "-v", is_flag=True, help="Show Lightning's and MLflow's logs and warnings, and tracebacks on errors."
)
@click.version_option(package_name="trainguard", prog_name="trainguard", message="%(prog)s %(version)s")
def app(verbose: bool) -> None:
    """Defense in depth for ML training pipelines: signed data shards, adversarial training, RONI checks."""
    from trainguard.pipeline.console import quiet_console

    _State.verbose = verbose
    quiet_console(verbose)


register_all(app)


def _exit_code(error: BaseException) -> int | None:
    """The exit code for a trainguard error (its `exit_code`), 2 for unusable input, None if not ours."""
    if isinstance(error, TrainguardError):
        return error.exit_code
    if isinstance(error, (FileNotFoundError, IsADirectoryError, PermissionError, UnicodeDecodeError)):
        return 2
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point: usage errors exit 2 (click's convention); project errors print one line and exit 1 or 2."""
    try:
        app.main(args=argv, prog_name="trainguard")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except Exception as error:
        code = _exit_code(error)
        if _State.verbose:
            raise
        if code is None:  # not a failure trainguard names: still one line, the traceback behind --verbose
            text = " ".join(str(error).split())
            click.echo(f"trainguard: error: {type(error).__name__}: {text} (--verbose shows the traceback)", err=True)
            return 1
        click.echo(f"trainguard: error: {' '.join(str(error).split())}", err=True)
        return code


if __name__ == "__main__":
    sys.exit(main())
