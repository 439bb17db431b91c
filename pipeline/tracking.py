"""MLflow tracking for a retraining cycle: one parent run, a nested run per stage, batched logging, and an
offline mode so an unreachable server never blocks a decision. The one place trainguard writes to MLflow: the
defenses and provenance return what they found (a screening report, verification reports) and a run logs it here.

Runs are created through `MlflowClient` (no global active run), so Lightning's `MLFlowLogger` can write into a
stage's run by id; every run ends with `trainguard.status` and `trainguard.reason` tags. Any tracking failure
switches the tracker offline: later calls are no-ops and `offline_reason` says why; the caller writes its local
report first and tells the user. The model is registered (an MLflow 3 logged model whose loader is trainguard's
installed code, see `mlflow_model`) and made the `champion` only when the caller says the gate accepted it; its
version's `trainguard.model_sha256` and `trainguard.cycle` tags are what `trainguard.load_model` checks it against.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainguard.pipeline.config import resolve_tracking_uri

if TYPE_CHECKING:
    import numpy as np

    from trainguard.defenses.report import ScreeningFiles
    from trainguard.defenses.roni import ScreeningReport
    from trainguard.provenance.verify import VerificationReport

MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_KEY = 250  # MAX_ENTITY_KEY_LENGTH
MAX_TAG_VALUE = 8000  # MAX_TAG_VAL_LENGTH
STATUS_TAG = "trainguard.status"
REASON_TAG = "trainguard.reason"
MAX_REASON = 4000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
PROBE_TIMEOUT = 3.0
MLFLOW_DIGEST_CHARS = 36
"""MLflow's cap on a dataset digest (its store column): an input's digest is the manifest SHA-256's first 36 hex
digits; the full digest is in the input's profile and tags."""
DATASET_SOURCE_TYPE = "local"
"""MLflow's registered source type for local files (`LocalArtifactDatasetSource`): resolvable without plugins."""
INPUT_TAG_LIMIT = 500
# Fail fast instead of MLflow's default 7 retries with exponential backoff (minutes on a dead server).
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


@dataclass(frozen=True)
class ModelRelease:
    """What registering an accepted model needs: the signed directory, the public keys it verifies against, an
    input example (for the model's signature), and what the version says about itself."""

    model_dir: Path
    model_key: Path
    attestation_key: Path
    example: np.ndarray
    description: str
    tags: Mapping[str, str] = field(default_factory=dict)


def cycle_tags(git_commit: str | None, manifests: Mapping[str, str], signer_keyids: Sequence[str]) -> dict[str, str]:
    """The tags every cycle run carries: code commit, manifest digests (name -> sha256) and signer keyids."""
    tags = {f"trainguard.manifest.{name}.sha256": digest for name, digest in manifests.items()}
    tags["trainguard.signer_keyids"] = ",".join(sorted(set(signer_keyids)))
    if git_commit:
        tags["mlflow.source.git.commit"] = git_commit
    return tags


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"training.max_epochs": "5", ...}; lists as JSON; values and keys cut to MLflow's limits."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        flat[_cut(name, MAX_KEY)] = _cut(text, MAX_PARAM_VALUE)
    return flat


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def probe(uri: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None if an http(s) tracking server answers /health within `timeout`, else why not (other schemes: None)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            return None if response.status == 200 else f"{uri}/health answered {response.status}"
    except urllib.error.HTTPError as error:
        return f"{uri}/health answered {error.code}"
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        return f"{uri} unreachable: {reason}"


class CycleTracker:
    """Connection to one experiment; `offline` once anything failed (then every call is a no-op)."""

    def __init__(self, uri: str, experiment_name: str, registered_model_name: str) -> None:
        self.uri = uri
        self.experiment_name = experiment_name
        self.registered_model_name = registered_model_name
        self.offline_reason: str | None = None
        self._client: Any = None
        self._experiment_id: str | None = None

    @classmethod
    def connect(
        cls,
        experiment_name: str,
        registered_model_name: str,
        uri: str | None = None,
        probe_timeout: float = PROBE_TIMEOUT,
    ) -> CycleTracker:
        """Resolves the URI, probes the server and opens the experiment; never raises for tracking problems."""
        for name, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        tracker = cls(resolve_tracking_uri(uri), experiment_name, registered_model_name)
        unreachable = probe(tracker.uri, probe_timeout)
        if unreachable is not None:
            tracker.offline_reason = unreachable
            return tracker
        with tracker._guard("open the experiment"):
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=tracker.uri, registry_uri=tracker.uri)
            experiment = client.get_experiment_by_name(experiment_name)
            tracker._experiment_id = (
                experiment.experiment_id if experiment is not None else client.create_experiment(experiment_name)
            )
            tracker._client = client
        return tracker

    @property
    def offline(self) -> bool:
        return self.offline_reason is not None

    @property
    def client(self) -> Any:
        """The MlflowClient (None offline), for the caller's own reads."""
        return None if self.offline else self._client

    @contextmanager
    def cycle(
        self, run_name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator[TrackedRun]:
        """The parent run of one cycle; logs the resolved config as params. FAILED if the block raises."""
        with self._run(run_name, None, tags) as run:
            if params:
                run.log_params(params)
            yield run

    @contextmanager
    def _run(self, name: str, parent: str | None, tags: Mapping[str, str] | None) -> Iterator[TrackedRun]:
        run = TrackedRun(self, None, name)
        if not self.offline:
            with self._guard(f"start run {name}"):
                start_tags = {**(tags or {}), **({"mlflow.parentRunId": parent} if parent else {})}
                start_tags = {tag.key: tag.value for tag in _tags(start_tags)}
                created = self._client.create_run(self._experiment_id, tags=start_tags, run_name=name)
                run.run_id = created.info.run_id
        status, outcome = "FAILED", {STATUS_TAG: "failed"}
        try:
            yield run
            status, outcome = "FINISHED", {STATUS_TAG: "done"}
        except BaseException as error:
            outcome[REASON_TAG] = " ".join(str(error).split()) or type(error).__name__
            raise
        finally:
            run.flush()
            if run.active:
                if parent is not None:  # a parent run's outcome is the cycle's: its owner tags it
                    run.set_tags(outcome)
                with self._guard(f"end run {name}"):
                    self._client.set_terminated(run.run_id, status)

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Runs a tracking call; any failure switches the tracker offline with a one-line reason."""
        try:
            yield
        except Exception as error:  # MlflowException, requests' and sqlalchemy's errors, OSError ...
            detail = " ".join(str(error).split())[:300] or type(error).__name__
            if self.offline_reason is None:
                self.offline_reason = f"tracking at {self.uri} failed to {what}: {detail}"


@dataclass
class TrackedRun:
    """One MLflow run (parent or stage); `run_id` is None offline. Metrics are buffered and sent with log_batch."""

    tracker: CycleTracker
    run_id: str | None
    name: str
    _metrics: list[Any] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.run_id is not None and not self.tracker.offline

    @contextmanager
    def stage(self, name: str, tags: Mapping[str, str] | None = None) -> Iterator[TrackedRun]:
        """A nested run (verification, screening, training, gate) under this one."""
        with self.tracker._run(name, self.run_id if self.active else None, tags) as run:
            yield run

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Buffers metrics; they go out in batches of up to 1000 (on flush, stage end, or a full buffer)."""
        if not self.active:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self._metrics += [Metric(_cut(k, MAX_KEY), float(v), stamp, step) for k, v in metrics.items()]
        if len(self._metrics) >= METRICS_PER_BATCH:
            self.flush()

    def flush(self) -> None:
        pending, self._metrics = self._metrics, []
        for start in range(0, len(pending), METRICS_PER_BATCH):
            if not self.active:
                return
            with self.tracker._guard(f"log metrics to {self.name}"):
                self.tracker._client.log_batch(self.run_id, metrics=pending[start : start + METRICS_PER_BATCH])

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Logs a (nested) mapping as flattened params, 100 per batch."""
        if not self.active:
            return
        from mlflow.entities import Param

        flat = sorted(flatten_params(params).items())
        for start in range(0, len(flat), PARAMS_PER_BATCH):
            chunk = [Param(k, v) for k, v in flat[start : start + PARAMS_PER_BATCH]]
            if self.tracker.offline:  # a failed batch takes the tracker offline
                return
            with self.tracker._guard(f"log params to {self.name}"):
                self.tracker._client.log_batch(self.run_id, params=chunk)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.active:
            return
        items = _tags(tags)
        for start in range(0, len(items), PARAMS_PER_BATCH):
            if self.tracker.offline:  # a failed batch takes the tracker offline
                return
            with self.tracker._guard(f"set tags on {self.name}"):
                self.tracker._client.log_batch(self.run_id, tags=items[start : start + PARAMS_PER_BATCH])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Uploads a file or a whole directory."""
        if not self.active:
            return
        with self.tracker._guard(f"upload {path}"):
            if Path(path).is_dir():
                self.tracker._client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.tracker._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        if not self.active:
            return
        with self.tracker._guard(f"upload {artifact_file}"):
            self.tracker._client.log_dict(self.run_id, dict(data), artifact_file)

    def log_datasets(self, reports: Sequence[VerificationReport], context: str = "training") -> None:
        """Records verified manifests as MLflow dataset inputs (see `dataset_input`)."""
        if not self.active or not reports:
            return
        inputs = [dataset_input(report, context) for report in reports]
        with self.tracker._guard(f"log dataset inputs to {self.name}"):
            self.tracker._client.log_inputs(self.run_id, datasets=inputs)

    def log_table(self, table: Mapping[str, Sequence[Any]], artifact_file: str) -> None:
        """One JSON table artifact (columns -> values), readable with `MlflowClient.load_table`."""
        if not self.active:
            return
        with self.tracker._guard(f"upload {artifact_file}"):
            self.tracker._client.log_table(self.run_id, {k: list(v) for k, v in table.items()}, artifact_file)

    def log_screening(self, report: ScreeningReport, files: ScreeningFiles) -> None:
        """A RONI screening: its summary as metrics, its config as params, every candidate's and every source's
        decision as one table each, and its local JSON report and plot under `roni/`."""
        from trainguard.defenses.report import (
            DECISIONS_TABLE,
            SOURCES_TABLE,
            decision_table,
            screening_params,
            screening_summary,
            source_table,
        )

        self.log_metrics(screening_summary(report))
        self.log_params(screening_params(report))
        self.log_table(decision_table(report), DECISIONS_TABLE)
        self.log_table(source_table(report), SOURCES_TABLE)
        self.log_artifact(files.json_path, "roni")
        self.log_artifact(files.plot_path, "roni")

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure as an image artifact."""
        if not self.active:
            return
        with self.tracker._guard(f"upload {artifact_file}"):
            self.tracker._client.log_figure(self.run_id, figure, artifact_file)

    def finish(self, status: str, reason: str, name: str | None = None) -> None:
        """Tags the run with the cycle's outcome (accepted, rejected, failed, ...) and why; renames it if asked."""
        self.set_tags({STATUS_TAG: status, REASON_TAG: reason[:MAX_REASON]})
        if name and self.active:
            with self.tracker._guard(f"rename run {self.name}"):
                self.tracker._client.update_run(self.run_id, name=name)
                self.name = name

    def lightning_logger(self) -> Any:
        """A Lightning `MLFlowLogger` writing into this run (None offline: train with `logger=False`)."""
        if not self.active:
            return None
        from pytorch_lightning.loggers import MLFlowLogger

        return MLFlowLogger(
            experiment_name=self.tracker.experiment_name, tracking_uri=self.tracker.uri, run_id=self.run_id
        )

    def register_model(self, release: ModelRelease) -> str | None:
        """Logs the accepted model as an MLflow 3 logged model of this run, registers it as a new version with its
        description and tags (which must hold the weights' `trainguard.model_sha256` and the `trainguard.cycle`:
        loading checks them), and moves the `champion` alias to it; call only on acceptance.

        Returns the version number, or None offline.
        """
        if not self.active:
            return None
        from mlflow.entities import LoggedModelOutput
        from mlflow.exceptions import MlflowException

        from trainguard.pipeline.mlflow_model import CHAMPION, save_pyfunc

        client = self.tracker._client
        name = self.tracker.registered_model_name
        version = None
        with self.tracker._guard(f"register model {name}"), tempfile.TemporaryDirectory() as scratch:
            local = save_pyfunc(
                release.model_dir, release.model_key, release.attestation_key, release.example, Path(scratch) / "m"
            )
            logged = client.create_logged_model(
                self.tracker._experiment_id, name="model", source_run_id=self.run_id, tags=dict(release.tags)
            )
            client.log_model_artifacts(logged.model_id, str(local))
            client.finalize_logged_model(logged.model_id, "READY")
            client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, 0)])
            try:
                client.get_registered_model(name)
            except MlflowException:
                client.create_registered_model(name)
            created = client.create_model_version(
                name,
                f"models:/{logged.model_id}",
                run_id=self.run_id,
                tags=dict(release.tags),
                description=release.description,
                model_id=logged.model_id,
            )
            version = str(created.version)
            client.set_registered_model_alias(name, CHAMPION, version)
        return None if self.tracker.offline else version


def _tags(tags: Mapping[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(_cut(k, MAX_KEY), _cut(str(v), MAX_TAG_VALUE)) for k, v in tags.items()]


def dataset_input(report: VerificationReport, context: str, tags: Mapping[str, str] | None = None) -> Any:
    """An `mlflow.entities.DatasetInput` for a verified manifest, used as `context` (training, holdout, ...): the one
    way trainguard records what data a run used. Its source is MLflow's `local` type with an absolute `file://` URI,
    so `mlflow.data.get_source(input)` resolves it anywhere."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = json.dumps({"uri": Path(report.manifest_path).resolve().as_uri()})
    profile = json.dumps(report.facts(), sort_keys=True)
    name = str(report.dataset or Path(report.manifest_path).name)
    digest = report.manifest_sha256[:MLFLOW_DIGEST_CHARS]
    dataset = Dataset(name, digest, DATASET_SOURCE_TYPE, source, None, profile)
    every = {"mlflow.data.context": context, "trainguard.sha256": report.manifest_sha256, **(tags or {})}
    return DatasetInput(dataset, [InputTag(k, str(v)[:INPUT_TAG_LIMIT]) for k, v in every.items()])
