"""MLflow tracking for a retraining cycle: one parent run, a nested run per stage, the accepted model as an MLflow 3
logged model with its metrics, params and datasets, and an offline mode so an unreachable server never blocks a
decision. The one place trainguard writes to MLflow: the defenses and provenance return what they found (a screening
report, verification reports) and a run logs it here.

Every MLflow call is made off the cycle's path, in the order the cycle asked for it, by one background thread per
tracker: the cycle only queues what to log (files it names are copied first, figures are drawn there), so logging
costs it microseconds per call; `CycleTracker.wait` (at the end of `cycle` unless the caller lets the uploads finish
in the background) and `wait_for_uploads` block until all is sent, and the thread finishes its queue before the
process exits. Runs are created through `MlflowClient` (no global active run); every run ends with `trainguard.status`
and `trainguard.reason` tags. Any tracking failure switches the tracker offline: later calls are no-ops and
`offline_reason` says why; the caller writes its local report first and tells the user. The model is registered (an
MLflow 3 logged model whose loader is trainguard's installed code, see `mlflow_model`) and made the `champion` only
when the caller says the gate accepted it; its version's `trainguard.model_sha256` and `trainguard.cycle` tags are what
`trainguard.load_model` checks it against.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
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
INPUT_TAG_LIMIT = 500
DATASETS_DIR = "datasets"
"""Where in a run's artifacts each manifest it used is kept: the dataset source, where DVC has no remote for it."""
EVAL_CONTEXT = "eval"
"""The `mlflow.data.context` of the held-out set, the data a model's metrics are measured on."""
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
    params: Mapping[str, Any] = field(default_factory=dict)
    """What the model was made with (the resolved config), logged as the logged model's params."""
    evaluated: frozenset[str] = frozenset()
    """The metrics measured on the held-out set: logged after registration, they are linked to the model and to the
    run's `eval` dataset (see `TrackedRun.log_datasets`)."""


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


_TRACKERS: weakref.WeakSet[CycleTracker] = weakref.WeakSet()


def wait_for_uploads() -> list[str]:
    """Blocks until every tracker of this process has sent what it queued (a cycle run with `wait_at_end=False`
    returns before); returns why any of them went offline, one line each."""
    return [reason for tracker in list(_TRACKERS) if (reason := tracker.wait()) is not None]


class CycleTracker:
    """Connection to one experiment; `offline` once anything failed (then every call is a no-op).

    Every MLflow call is queued for the tracker's one background thread, which makes them in order; `wait` blocks
    until the queue is empty.
    """

    def __init__(self, uri: str, experiment_name: str, registered_model_name: str, wait_at_end: bool = True) -> None:
        self.uri = uri
        self.experiment_name = experiment_name
        self.registered_model_name = registered_model_name
        self.wait_at_end = wait_at_end
        self.offline_reason: str | None = None
        self._client: Any = None
        self._experiment_id: str | None = None
        self._uploads: ThreadPoolExecutor | None = None
        self._scratch: tempfile.TemporaryDirectory[str] | None = None

    @classmethod
    def connect(
        cls,
        experiment_name: str,
        registered_model_name: str,
        uri: str | None = None,
        probe_timeout: float = PROBE_TIMEOUT,
        wait_at_end: bool = True,
    ) -> CycleTracker:
        """Resolves the URI and probes the server, then queues opening the experiment; never raises for tracking
        problems.

        Args:
            experiment_name: The MLflow experiment the runs go to (created if missing).
            registered_model_name: The registered model an accepted model becomes a version of.
            uri: The tracking URI (the environment's `MLFLOW_TRACKING_URI` wins, see `resolve_tracking_uri`).
            probe_timeout: Seconds the server's /health may take to answer.
            wait_at_end: Whether a `cycle` block waits at its end until MLflow has everything; if not, the uploads
                finish in the background (`wait_for_uploads`, and before the process exits).

        Returns:
            The tracker, offline (with `offline_reason`) if the server did not answer.
        """
        for name, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        tracker = cls(resolve_tracking_uri(uri), experiment_name, registered_model_name, wait_at_end)
        unreachable = probe(tracker.uri, probe_timeout)
        if unreachable is not None:
            tracker.offline_reason = unreachable
            return tracker
        tracker._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainguard-mlflow")
        tracker._scratch = tempfile.TemporaryDirectory(prefix="trainguard-mlflow-")
        _TRACKERS.add(tracker)
        tracker._submit("open the experiment", tracker._open)
        return tracker

    def _open(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        experiment = client.get_experiment_by_name(self.experiment_name)
        self._experiment_id = (
            experiment.experiment_id if experiment is not None else client.create_experiment(self.experiment_name)
        )
        self._client = client

    @property
    def offline(self) -> bool:
        """Whether tracking stopped (the server did not answer, or a call failed): later calls do nothing."""
        return self.offline_reason is not None

    def wait(self) -> str | None:
        """Blocks until every queued MLflow call is made (or skipped, offline); returns why it is offline, if so."""
        if self._uploads is not None:
            self._uploads.submit(lambda: None).result()
        return self.offline_reason

    @contextmanager
    def cycle(
        self, run_name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator[TrackedRun]:
        """The parent run of one cycle; logs the resolved config as params. FAILED if the block raises. At its end it
        waits until MLflow has everything, unless the tracker lets the uploads finish in the background."""
        try:
            with self._run(run_name, None, tags) as run:
                if params:
                    run.log_params(params)
                yield run
        finally:
            if self.wait_at_end:
                self.wait()

    @contextmanager
    def _run(self, name: str, parent: TrackedRun | None, tags: Mapping[str, str] | None) -> Iterator[TrackedRun]:
        run = TrackedRun(self, None, name)
        self._submit(f"start run {name}", functools.partial(run._create, dict(tags or {}), parent))
        status, outcome = "FAILED", {STATUS_TAG: "failed"}
        try:
            yield run
            status, outcome = "FINISHED", {STATUS_TAG: "done"}
        except BaseException as error:
            outcome[REASON_TAG] = " ".join(str(error).split()) or type(error).__name__
            raise
        finally:
            run.flush()
            if parent is not None:  # a parent run's outcome is the cycle's: its owner tags it
                run.set_tags(outcome)
            self._submit(f"end run {name}", functools.partial(run._end, status))

    def _submit(self, what: str, call: Callable[[], None]) -> None:
        """Queues one MLflow call (`what` names it in the offline reason); nothing once offline."""
        if self._uploads is not None and not self.offline:
            self._uploads.submit(self._attempt, what, call)

    def _attempt(self, what: str, call: Callable[[], None]) -> None:
        """Makes a queued call, skipped once offline; any failure switches the tracker offline with a one-line
        reason."""
        if self.offline:
            return
        try:
            call()
        except Exception as error:  # MlflowException, requests' and sqlalchemy's errors, OSError ...
            detail = " ".join(str(error).split())[:300] or type(error).__name__
            if self.offline_reason is None:
                self.offline_reason = f"tracking at {self.uri} failed to {what}: {detail}"

    def _snapshot(self, path: Path) -> Path | None:
        """A copy of a file or folder to upload later, so what is sent is what the cycle named when it asked; None
        (and offline) if it cannot be read."""
        if self._scratch is None:
            return None
        folder = Path(tempfile.mkdtemp(dir=self._scratch.name))
        copy = folder / path.name
        try:
            if path.is_dir():
                shutil.copytree(path, copy)
            else:
                shutil.copyfile(path, copy)
        except OSError as error:
            shutil.rmtree(folder, ignore_errors=True)
            if self.offline_reason is None:
                self.offline_reason = f"tracking at {self.uri} failed to read {path} for upload: {error}"
            return None
        return copy


@dataclass(frozen=True)
class _Point:
    """A metric value as the cycle logged it; `for_model`: logged after the model's registration (linked to it)."""

    key: str
    value: float
    timestamp: int
    step: int
    for_model: bool


@dataclass(frozen=True)
class _DatasetUse:
    """A manifest a run used, as what (`context`) and under which dataset name; `copy`: its bytes to upload."""

    report: VerificationReport
    context: str
    name: str
    copy: Path


@dataclass
class TrackedRun:
    """One MLflow run (parent or stage); `run_id` is set once MLflow made it (None offline). Metrics are buffered
    and sent with log_batch. After `register_model`, `model_id` and `registered_version` say what it registered."""

    tracker: CycleTracker
    run_id: str | None
    name: str
    model_id: str | None = None
    registered_version: str | None = None
    _metrics: list[_Point] = field(default_factory=list)
    _artifact_uri: str | None = None
    _evaluation: tuple[str, str] | None = None
    _evaluated: frozenset[str] = frozenset()
    _registering: bool = False

    @property
    def active(self) -> bool:
        """Whether this run logs (its tracker is online)."""
        return not self.tracker.offline

    def _create(self, tags: dict[str, str], parent: TrackedRun | None) -> None:
        if parent is not None:
            tags["mlflow.parentRunId"] = str(parent.run_id)
        start_tags = {tag.key: tag.value for tag in _tags(tags)}
        created = self.tracker._client.create_run(self.tracker._experiment_id, tags=start_tags, run_name=self.name)
        self.run_id = created.info.run_id
        self._artifact_uri = created.info.artifact_uri

    def _end(self, status: str) -> None:
        self.tracker._client.set_terminated(self.run_id, status)

    @contextmanager
    def stage(self, name: str, tags: Mapping[str, str] | None = None) -> Iterator[TrackedRun]:
        """A nested run (verification, screening, training, gate) under this one."""
        with self.tracker._run(name, self if self.active else None, tags) as run:
            yield run

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Buffers metrics; they go out in batches of up to 1000 (on flush, stage end, or a full buffer). Once the
        run registered a model, its metrics are the model's too (those measured on the held-out set linked to the
        run's `eval` dataset)."""
        if not self.active:
            return
        stamp = int(time.time() * 1000)
        self._metrics += [
            _Point(_cut(k, MAX_KEY), float(v), stamp, step, self._registering) for k, v in metrics.items()
        ]
        if len(self._metrics) >= METRICS_PER_BATCH:
            self.flush()

    def flush(self) -> None:
        """Queues the buffered metrics."""
        pending, self._metrics = self._metrics, []
        if pending and self.active:
            self.tracker._submit(f"log metrics to {self.name}", functools.partial(self._send_metrics, pending))

    def _send_metrics(self, points: list[_Point]) -> None:
        from mlflow.entities import Metric

        metrics = []
        for point in points:
            model_id = self.model_id if point.for_model else None
            dataset = self._evaluation if model_id and point.key in self._evaluated else None
            name, digest = dataset or (None, None)
            metrics.append(Metric(point.key, point.value, point.timestamp, point.step, model_id, name, digest))
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            self.tracker._client.log_batch(self.run_id, metrics=metrics[start : start + METRICS_PER_BATCH])

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Logs a (nested) mapping as flattened params, 100 per batch."""
        if self.active:
            flat = sorted(flatten_params(params).items())
            self.tracker._submit(f"log params to {self.name}", functools.partial(self._send_params, flat))

    def _send_params(self, flat: list[tuple[str, str]]) -> None:
        from mlflow.entities import Param

        for start in range(0, len(flat), PARAMS_PER_BATCH):
            chunk = [Param(k, v) for k, v in flat[start : start + PARAMS_PER_BATCH]]
            self.tracker._client.log_batch(self.run_id, params=chunk)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Sets tags (cut to MLflow's limits), 100 per batch."""
        if self.active:
            self.tracker._submit(f"set tags on {self.name}", functools.partial(self._send_tags, _tags(tags)))

    def _send_tags(self, items: list[Any]) -> None:
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self.tracker._client.log_batch(self.run_id, tags=items[start : start + PARAMS_PER_BATCH])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Uploads a file or a whole directory, as it is now."""
        copy = self.tracker._snapshot(Path(path)) if self.active else None
        if copy is not None:
            self.tracker._submit(f"upload {path}", functools.partial(self._upload, copy, artifact_path))

    def _upload(self, copy: Path, artifact_path: str | None) -> None:
        try:
            if copy.is_dir():
                self.tracker._client.log_artifacts(self.run_id, str(copy), artifact_path)
            else:
                self.tracker._client.log_artifact(self.run_id, str(copy), artifact_path)
        finally:
            shutil.rmtree(copy.parent, ignore_errors=True)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """One JSON artifact of `data` as it is now."""
        if self.active:
            text = json.loads(json.dumps(data, default=str))
            call = functools.partial(self._client_call, "log_dict", text, artifact_file)
            self.tracker._submit(f"upload {artifact_file}", call)

    def _client_call(self, method: str, *args: Any) -> None:
        getattr(self.tracker._client, method)(self.run_id, *args)

    def log_datasets(self, reports: Sequence[VerificationReport], evaluation: VerificationReport | None = None) -> None:
        """Records verified manifests as MLflow dataset inputs (see `dataset_input`): each of `reports` as
        `training` data, and the manifest that signs the held-out set (`evaluation`) as the `eval` dataset
        `<dataset>-holdout`, which the metrics of a model this run registers are linked to. Each manifest is kept in
        the run's artifacts (`datasets/<dataset>/`): the source of its input where DVC has no remote for the data."""
        if not self.active or not (reports or evaluation):
            return
        named = [(r, "training", _dataset_name(r)) for r in reports]
        if evaluation is not None:
            named.append((evaluation, EVAL_CONTEXT, f"{_dataset_name(evaluation)}-holdout"))
        uses = []
        for report, context, name in named:
            copy = self.tracker._snapshot(Path(report.manifest_path))
            if copy is None:
                return
            uses.append(_DatasetUse(report, context, name, copy))
        if evaluation is not None:
            self._evaluation = (uses[-1].name, evaluation.manifest_sha256[:MLFLOW_DIGEST_CHARS])
        self.tracker._submit(f"log dataset inputs to {self.name}", functools.partial(self._send_datasets, uses))

    def _send_datasets(self, uses: list[_DatasetUse]) -> None:
        client, inputs, sent = self.tracker._client, [], set()
        try:
            for use in uses:
                folder = f"{DATASETS_DIR}/{_dataset_name(use.report)}"
                if use.report.manifest_sha256 not in sent:
                    client.log_artifact(self.run_id, str(use.copy), folder)
                    sent.add(use.report.manifest_sha256)
                logged = f"{self._artifact_uri}/{folder}/{use.copy.name}"
                source = dataset_source(Path(use.report.data_dir), logged, self.tracker.uri)
                inputs.append(dataset_input(use.report, use.context, source, name=use.name))
        finally:
            for use in uses:
                shutil.rmtree(use.copy.parent, ignore_errors=True)
        client.log_inputs(self.run_id, datasets=inputs)

    def log_table(self, table: Mapping[str, Sequence[Any]], artifact_file: str) -> None:
        """One JSON table artifact (columns -> values), readable with `MlflowClient.load_table`."""
        if self.active:
            columns = {k: list(v) for k, v in table.items()}
            call = functools.partial(self._client_call, "log_table", columns, artifact_file)
            self.tracker._submit(f"upload {artifact_file}", call)

    def log_table_file(self, path: Path, artifact_file: str) -> None:
        """A columnar table file (parquet) as it is now, as the artifact `artifact_file`; read it back with pyarrow
        (`MlflowClient.load_table` reads JSON tables only). A decision per shard stays one file, not a JSON blob.

        Args:
            path: The local file (e.g. the decision table beside the cycle's report).
            artifact_file: Its name in the run's artifacts (`folder/name.parquet`).
        """
        copy = self.tracker._snapshot(Path(path)) if self.active else None
        if copy is not None:
            target = PurePosixPath(artifact_file)
            named = copy.rename(copy.with_name(target.name))
            folder = str(target.parent) if target.parent != PurePosixPath(".") else None
            self.tracker._submit(f"upload {artifact_file}", functools.partial(self._upload, named, folder))

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

    def log_figure(self, draw: Callable[[], Any], artifact_file: str) -> None:
        """A matplotlib figure as an image artifact; `draw` makes it on the tracker's thread, off the cycle's path
        (nothing is drawn offline)."""
        if self.active:
            self.tracker._submit(f"upload {artifact_file}", functools.partial(self._send_figure, draw, artifact_file))

    def _send_figure(self, draw: Callable[[], Any], artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        figure = draw()
        try:
            self.tracker._client.log_figure(self.run_id, figure, artifact_file)
        finally:
            plt.close(figure)

    def finish(self, status: str, reason: str, name: str | None = None) -> None:
        """Tags the run with the cycle's outcome (accepted, rejected, failed, ...) and why; renames it if asked."""
        self.set_tags({STATUS_TAG: status, REASON_TAG: reason[:MAX_REASON]})
        if name and self.active:
            self.tracker._submit(f"rename run {self.name}", functools.partial(self._rename, name))

    def _rename(self, name: str) -> None:
        self.tracker._client.update_run(self.run_id, name=name)
        self.name = name

    def lightning_logger(self) -> Any:
        """A Lightning logger writing into this run through the tracker's queue (None offline: train with
        `logger=False`)."""
        if not self.active:
            return None
        from trainguard.pipeline.run_logger import RunLogger

        return RunLogger(self)

    def register_model(self, release: ModelRelease) -> None:
        """Queues logging the accepted model as an MLflow 3 logged model of this run (its params the release's),
        registering it as a new version with its description and tags (which must hold the weights'
        `trainguard.model_sha256` and the `trainguard.cycle`: loading checks them), moving the `champion` alias to
        it and describing the registered model by it; call only on acceptance. The metrics this run logs from now
        on are the model's (see `log_metrics`); `model_id` and `registered_version` are set once it is done."""
        if not self.active:
            return
        self._evaluated = release.evaluated
        self._registering = True
        params = flatten_params(release.params)
        self.tracker._submit(
            f"register model {self.tracker.registered_model_name}", functools.partial(self._register, release, params)
        )

    def _register(self, release: ModelRelease, params: dict[str, str]) -> None:
        from mlflow.entities import LoggedModelOutput
        from mlflow.exceptions import MlflowException

        from trainguard.pipeline.mlflow_model import CHAMPION, save_pyfunc

        client = self.tracker._client
        name = self.tracker.registered_model_name
        with tempfile.TemporaryDirectory() as scratch:
            local = save_pyfunc(
                release.model_dir, release.model_key, release.attestation_key, release.example, Path(scratch) / "m"
            )
            logged = client.create_logged_model(
                self.tracker._experiment_id,
                name="model",
                source_run_id=self.run_id,
                tags=dict(release.tags),
                params=params,
            )
            client.log_model_artifacts(logged.model_id, str(local))
        client.finalize_logged_model(logged.model_id, "READY")
        client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, 0)])
        self.model_id = logged.model_id
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
        client.update_registered_model(name, description=f"`{CHAMPION}` is version {version}. {release.description}")
        self.registered_version = version


def _tags(tags: Mapping[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(_cut(k, MAX_KEY), _cut(str(v), MAX_TAG_VALUE)) for k, v in tags.items()]


def _dataset_name(report: VerificationReport) -> str:
    return str(report.dataset or Path(report.manifest_path).name)


def dataset_input(report: VerificationReport, context: str, source_uri: str, name: str | None = None) -> Any:
    """An `mlflow.entities.DatasetInput` for a verified manifest, used as `context` (training, eval): the one way
    trainguard records what data a run used. Its source is `source_uri` (see `dataset_source`) as the MLflow dataset
    source that resolves it, so `mlflow.data.get_source(input)` loads it on any machine that reaches it; its digest
    is the manifest SHA-256's first 36 hex digits (the full one in its profile and `trainguard.sha256` tag).

    Args:
        report: The manifest's verification report.
        context: What the run used it as (`mlflow.data.context`).
        source_uri: Where the data is found: a DVC remote URL or the URL of the manifest logged to MLflow.
        name: The dataset's name (default: the dataset the manifest signs).

    Returns:
        The dataset input to log with `MlflowClient.log_inputs`.
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = resolve_dataset_source(source_uri)
    profile = json.dumps(report.facts(), sort_keys=True)
    digest = report.manifest_sha256[:MLFLOW_DIGEST_CHARS]
    dataset = Dataset(name or _dataset_name(report), digest, source._get_source_type(), source.to_json(), None, profile)
    tags = {"mlflow.data.context": context, "trainguard.sha256": report.manifest_sha256}
    return DatasetInput(dataset, [InputTag(k, v[:INPUT_TAG_LIMIT]) for k, v in tags.items()])


def dataset_source(data_dir: Path, logged_uri: str, tracking_uri: str) -> str:
    """Where another machine finds a dataset: the DVC remote URL of the DVC out holding its data folder where DVC
    tracks the folder and has a remote for it (`provenance.dvc.remote_url`, without credentials), else the URL of its
    manifest as logged to MLflow (`logged_uri`, an artifact URI; `mlflow-artifacts:` ones as the tracking server's
    HTTP URL). A local path only where MLflow itself keeps its artifacts locally.

    Args:
        data_dir: The folder the manifest's shards were read from.
        logged_uri: The artifact URI the manifest was logged at.
        tracking_uri: The tracking server's URI, which serves `mlflow-artifacts:` URIs.

    Returns:
        The URI to record as the dataset's source.
    """
    return _dvc_remote_url(data_dir) or _artifact_url(logged_uri, tracking_uri)


def _dvc_remote_url(data_dir: Path) -> str | None:
    """The URL of the DVC out holding `data_dir` in its repository's remote (`provenance.dvc.remote_url`, without
    credentials); None where there is none, where DVC cannot answer (the logged manifest is the source then, and
    tracking goes on), or where it is a local path: no place another machine can read."""
    from trainguard.provenance.dvc import remote_url
    from trainguard.provenance.errors import DataDirError

    try:
        url = remote_url(data_dir)
    except DataDirError:
        return None
    return None if url is None or urllib.parse.urlparse(url).scheme in ("", "file") else url


def _artifact_url(uri: str, tracking_uri: str) -> str:
    if uri.startswith("mlflow-artifacts:") and tracking_uri.startswith(("http://", "https://")):
        from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

        return str(MlflowArtifactsRepository.resolve_uri(uri, tracking_uri))  # type: ignore[no-untyped-call]
    return uri
