"""What a trainguard command shows: its own lines, a progress display per long stage on a terminal, a closing
table; Lightning's, MLflow's and other libraries' chatter (info logs, warnings) only with `--verbose`."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
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
    for each in root.handlers:
        each.setLevel(logging.INFO if verbose else logging.ERROR)
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


Progress = Callable[[int, int], None]
"""Told (done, total) as a stage advances, e.g. RONI's copies trained of those planned."""


@contextmanager
def stage(label: str, *, counting: str | None = None, display: bool = True) -> Iterator[Progress]:
    """A long stage (verifying, screening, training) shown while it runs. On a terminal: a spinner, or with
    `counting` (what is counted, e.g. "copies") a bar with the count and the time left, fed by the progress callback
    this yields; `display=False` leaves the terminal to a display of its own (Lightning's epoch bar). Off a terminal
    (pipes, CI): one line when the stage starts and one when it ends, with its time, so a log never sits silent."""
    started = time.monotonic()
    if not interactive():
        note(f"{label} ...")
        try:
            yield _ignored
        except BaseException:
            note(f"{label} stopped after {_seconds(time.monotonic() - started)}")
            raise
        note(f"{label} done in {_seconds(time.monotonic() - started)}")
        return
    if not display:
        yield _ignored
        return
    from rich.console import Console

    if counting is None:
        with Console(stderr=True).status(label):
            yield _ignored
        return
    from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    columns = (SpinnerColumn(), TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(counting))
    with Bar(*columns, TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _ignored(done: int, total: int) -> None:
    """The progress callback where nothing shows the count (off a terminal, or another display owns it)."""


def _seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


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


def rows_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
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
