"""Records a RONI screening: a local JSON report and PNG plot first, then the same to MLflow when it is reachable.

MLflow gets a compact summary (level, counts, flagged sources, time) as metrics, the screening config as params,
every candidate's decision with its p-values as one table (`roni/decisions.json`) and every source's as another
(`roni/sources.json`, through `log_table`), and the JSON report and plot as artifacts: a fixed number of calls and
keys however many shards are screened.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from trainguard.defenses.roni import ScreeningReport
from trainguard.files import atomic_write

DECISIONS_TABLE = "roni/decisions.json"
SOURCES_TABLE = "roni/sources.json"


@dataclass(frozen=True)
class ReportOutcome:
    """Where the report went: always the local files; the MLflow run id, or why MLflow was not reached."""

    json_path: Path
    plot_path: Path
    run_id: str | None
    mlflow_error: str | None

    @property
    def logged_to_mlflow(self) -> bool:
        return self.run_id is not None


def plot_impacts(report: ScreeningReport, path: Path) -> Path:
    """Bar chart of each candidate's -log10 adjusted p-value (red when rejected) against the level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(report.decisions) + 2), 4))
    try:
        names = [d.name for d in report.decisions]
        colors = ["tab:green" if d.accepted else "tab:red" for d in report.decisions]
        heights = [-math.log10(d.adjusted_p_value) for d in report.decisions]
        ax.bar(range(len(names)), heights, color=colors, label="candidates")
        level = report.config.level
        ax.axhline(-math.log10(level), color="black", linestyle="--", label=f"level {level:g}")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_ylabel("-log10 adjusted p-value")
        ax.set_title(f"RONI screening: adjusted p-value per candidate ({report.config.error_control})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def _reachable(uri: str) -> str | None:
    """None when an HTTP tracking server answers /health, else why not (non-HTTP stores are assumed local)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=3) as response:
            return None if response.status == 200 else f"health check answered {response.status}"
    except OSError as error:
        return f"{type(error).__name__}: {error}"


def _log_to_mlflow(
    report: ScreeningReport,
    json_path: Path,
    plot_path: Path,
    uri: str,
    experiment: str,
    run_name: str,
    run_id: str | None = None,
) -> str:
    """Logs into `run_id` when given (the caller owns that run), else into a new run it finishes itself."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=uri)
    owned = run_id is None
    if run_id is None:
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    try:
        now = int(time.time() * 1000)
        metrics = [Metric(name, float(value), now, 0) for name, value in screening_summary(report).items()]
        params = [
            Param(
                "roni.calibration_sizes",
                ",".join(str(size) for size in sorted({c.size for c in report.calibration.strata})),
            )
        ]
        params += [Param(f"roni.{k}", str(v)) for k, v in asdict(report.config).items()]
        client.log_batch(run_id, metrics=metrics, params=params[:100])
        client.log_table(run_id, decision_table(report), DECISIONS_TABLE)
        client.log_table(run_id, source_table(report), SOURCES_TABLE)
        client.log_artifact(run_id, str(json_path), artifact_path="roni")
        client.log_artifact(run_id, str(plot_path), artifact_path="roni")
    except BaseException:
        if owned:
            client.set_terminated(run_id, "FAILED")
        raise
    if owned:
        client.set_terminated(run_id, "FINISHED")
    return run_id


def screening_summary(report: ScreeningReport) -> dict[str, float]:
    """The screening's headline numbers, the same in MLflow and in the local report."""
    return {
        "roni/level": report.config.level,
        "roni/candidates": float(len(report.decisions)),
        "roni/accepted": float(len(report.accepted)),
        "roni/rejected": float(len(report.rejected)),
        "roni/flagged_sources": float(len(report.flagged)),
        "roni/seconds": report.seconds,
    }


def decision_table(report: ScreeningReport) -> dict[str, list[object]]:
    """One column per decision field, one row per candidate (for `log_table`: one artifact, not a metric each)."""
    return _columns(report.to_dict()["decisions"])


def source_table(report: ScreeningReport) -> dict[str, list[object]]:
    """One column per source-decision field, one row per source."""
    return _columns(report.to_dict()["sources"])


def _columns(rows: object) -> dict[str, list[object]]:
    assert isinstance(rows, list)
    columns = list(rows[0]) if rows else []
    return {column: [row[column] for row in rows] for column in columns}


def record_screening(
    report: ScreeningReport,
    directory: Path,
    tracking_uri: str | None = None,
    experiment: str = "trainguard-roni",
    run_name: str = "roni-screening",
    run_id: str | None = None,
) -> ReportOutcome:
    """Writes `roni-report.json` and `roni-impacts.png` into `directory`, then logs both to MLflow.

    MLflow being unreachable or failing does not raise: the outcome says why and the local files remain.
    `tracking_uri` defaults to MLflow's own resolution (MLFLOW_TRACKING_URI); with `run_id` the results go into
    that existing run (e.g. a pipeline's screening stage), which is left open for its owner.
    """
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "roni-report.json"
    atomic_write(json_path, json.dumps(report.to_dict(), indent=2, allow_nan=False).encode())
    plot_path = plot_impacts(report, directory / "roni-impacts.png")
    if tracking_uri is None:
        import mlflow

        tracking_uri = mlflow.get_tracking_uri()
    uri: str = tracking_uri
    problem = _reachable(uri)
    if problem:
        return ReportOutcome(
            json_path, plot_path, None, f"MLflow at {uri} unreachable ({problem}); report kept locally"
        )
    try:
        run_id = _log_to_mlflow(report, json_path, plot_path, uri, experiment, run_name, run_id)
    except Exception as error:
        return ReportOutcome(
            json_path, plot_path, None, f"MLflow logging to {uri} failed ({error}); report kept locally"
        )
    return ReportOutcome(json_path, plot_path, run_id, None)
