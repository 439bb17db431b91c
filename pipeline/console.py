"""What a trainguard command shows: its own lines, a progress display per long stage on a terminal, a closing
table; Lightning's, MLflow's and other libraries' chatter (info logs, warnings) only with `--verbose`."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_LIBRARY_LOGGERS = ("pytorch_lightning", "lightning", "lightning_fabric", "lightning.pytorch", "torch", "mlflow")


class _Settings:
    verbose = False


def quiet_console(verbose: bool = False) -> None:
    """Shows only trainguard's lines unless `verbose`: third-party warnings are ignored, library loggers (which
    Lightning and MLflow set to INFO at import) propagate to one root handler that passes warnings and errors."""
    _Settings.verbose = verbose
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false" if verbose else "true")  # "View run"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true" if verbose else "false")
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(handler)
    for handler in root.handlers:
        handler.setLevel(logging.INFO if verbose else logging.ERROR)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    if not verbose:
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"trainguard(\.|$)")


def is_verbose() -> bool:
    return _Settings.verbose


def interactive() -> bool:
    """Progress displays only on a terminal (never in CI logs, pipes or captured test output)."""
    return sys.stderr.isatty()


def epoch_progress() -> Any:
    """Lightning's rich progress bar (one per epoch) on a terminal, else None (no bar)."""
    if not interactive():
        return None
    from pytorch_lightning.callbacks import RichProgressBar

    return RichProgressBar(leave=False)


@contextmanager
def stage(label: str) -> Iterator[None]:
    """A spinner naming a long stage (verifying, screening) while it runs, on a terminal; nothing otherwise."""
    if not interactive():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(label):
        yield


def table(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column summary table on stdout (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    summary = Table(title=title, show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    for name, value in rows:
        summary.add_row(name, value)
    Console(width=None if sys.stdout.isatty() else 120).print(summary)


def rows_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A table with a header row on stdout (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    listing = Table(*header)
    for row in rows:
        listing.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 160).print(listing)


def note(message: str) -> None:
    """One line of trainguard's own news on stderr (what a command did beyond its result), e.g. a rebuilt state."""
    print(f"trainguard: {message}", file=sys.stderr)
