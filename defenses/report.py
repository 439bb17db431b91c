"""Records a RONI screening: a local JSON report and PNG plot first, then the same to MLflow when it is reachable.

Impacts go to MLflow as metrics, thresholds and config as params, decisions and reasons as tags, the JSON report and
the plot as artifacts, all through `log_batch` (one call per 1,000 metrics / 100 params / 100 tags).
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from trainguard.defenses.roni import ScreeningReport
from trainguard.files import atomic_write

_KEY = re.compile(r"[^A-Za-z0-9_\-./ ]")


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
    """Bar chart of each candidate's impact (red when rejected) and the calibration impacts against the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(report.decisions) + 2), 4))
    try:
        names = [d.name for d in report.decisions]
        colors = ["tab:green" if d.accepted else "tab:red" for d in report.decisions]
        ax.bar(range(len(names)), [d.impact for d in report.decisions], color=colors, label="candidates")
        ax.scatter(
            [-1] * len(report.calibration_impacts), report.calibration_impacts, s=8, color="gray", label="calibration"
        )
        ax.axhline(report.threshold, color="black", linestyle="--", label=f"threshold {report.threshold:.4f}")
        ax.set_xticks([-1, *range(len(names))], ["calib.", *names], rotation=90, fontsize=7)
        ax.set_ylabel("held-out soft-accuracy drop")
        ax.set_title("RONI screening: impact per candidate")
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


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)] or [[]]


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
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(tracking_uri=uri)
    owned = run_id is None
    if owned:
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    try:
        now = int(time.time() * 1000)
        metrics = [Metric("roni.threshold", report.threshold, now, 0)]
        params = [
            Param("roni.threshold", repr(report.threshold)),
            Param("roni.calibration_rows", str(report.calibration_size)),
        ]
        params += [Param(f"roni.{k}", str(v)) for k, v in asdict(report.config).items()]
        tags = [
            RunTag("roni.rejected", str(len(report.rejected))),
            RunTag("roni.accepted", str(len(report.accepted))),
        ]
        for d in report.decisions:
            key = _KEY.sub("_", d.name)
            metrics.append(Metric(f"roni.impact.{key}", d.impact, now, 0))
            metrics += [
                Metric(f"roni.class_impact.{key}.{c}", v, now, 0) for c, v in enumerate(d.class_impacts) if v == v
            ]
            tags += [
                RunTag(f"roni.decision.{key}", "accepted" if d.accepted else "rejected"),
                RunTag(f"roni.reason.{key}", d.reason),
                RunTag(f"roni.source.{key}", d.source),
            ]
        for i in range(max(len(_chunks(metrics, 1000)), len(_chunks(params, 100)), len(_chunks(tags, 100)))):
            client.log_batch(
                run_id,
                metrics=metrics[i * 1000 : (i + 1) * 1000],
                params=params[i * 100 : (i + 1) * 100],
                tags=tags[i * 100 : (i + 1) * 100],
            )
        client.log_artifact(run_id, str(json_path), artifact_path="roni")
        client.log_artifact(run_id, str(plot_path), artifact_path="roni")
    except BaseException:
        if owned:
            client.set_terminated(run_id, "FAILED")
        raise
    if owned:
        client.set_terminated(run_id, "FINISHED")
    return run_id


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
