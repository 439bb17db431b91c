"""A Lightning logger that writes into a tracked run: training's metrics and hyperparameters join the tracker's queue
of MLflow calls (see `tracking`), so the training loop never waits on the server."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.utilities import rank_zero_only
from typing_extensions import override

if TYPE_CHECKING:
    from trainguard.pipeline.tracking import TrackedRun


class RunLogger(Logger):
    """Lightning's metrics (`train/loss`, `val/acc`, ...) by step and the module's hyperparameters as params, in the
    tracked run it was made for (`TrackedRun.lightning_logger`)."""

    def __init__(self, run: TrackedRun) -> None:
        super().__init__()
        self._run = run

    @property
    @override
    def name(self) -> str:
        """The MLflow experiment."""
        return self._run.tracker.experiment_name

    @property
    @override
    def version(self) -> str:
        """The run's name (its id exists only once MLflow made it)."""
        return self._run.name

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Queues the metrics at `step` (0 if none)."""
        self._run.log_metrics({key: float(value) for key, value in metrics.items()}, step=step or 0)

    @override
    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Queues the hyperparameters as (flattened) params."""
        self._run.log_params(vars(params) if isinstance(params, Namespace) else dict(params))
