"""MLflow tracking of a cycle against a real server, read back with MlflowClient; offline when unreachable."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from trainguard.pipeline.config import load_config
from trainguard.pipeline.tracking import CycleTracker, DatasetRef, cycle_tags, flatten_params, resolve_tracking_uri

DIGITS = Path(__file__).resolve().parents[2] / "configs" / "digits.yaml"
SHA = "ab" * 32


def _names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"exp-{tag}", f"model-{tag}"


def _fit_briefly(logger: object) -> None:
    """One epoch of the digits classifier on a few rows, logging through the given Lightning logger."""
    import pytorch_lightning as pl
    import torch
    from digits_demo.models import DigitsClassifier
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.rand(32, 64), torch.randint(0, 10, (32,)))
    trainer = pl.Trainer(
        max_epochs=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsClassifier(channels=2), DataLoader(data, batch_size=16))


def test_a_cycle_lands_as_a_parent_run_with_nested_stage_runs(mlflow_uri: str, tmp_path: Path) -> None:
    experiment, registered = _names()
    config = load_config(DIGITS, check_components=False)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"decision": "accepted"}))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights")

    tracker = CycleTracker.connect(experiment, registered)
    assert not tracker.offline, tracker.offline_reason
    assert tracker.uri == mlflow_uri
    tags = cycle_tags("abc", {"train": SHA}, ["k2", "k1", "k2"])
    with tracker.cycle("cycle-1", params=config.resolved(), tags=tags) as parent:
        with parent.stage("verification") as verification:
            verification.log_datasets([DatasetRef("train", SHA, "file:///data/train.manifest.json")])
            verification.set_tags({"trainguard.manifest.train.sha256": SHA})
            verification.log_metrics({"verify/shards": 14, "verify/failed": 1})
        with parent.stage("training") as training:
            for step in range(300):  # 1,200 points: two log_batch calls, not 1,200 calls
                training.log_metrics({"a": step, "b": 2 * step, "c": 0.5, "d": 1.0}, step=step)
            _fit_briefly(training.lightning_logger())
        with parent.stage("gate") as gate:
            gate.log_metrics({"gate/clean_accuracy": 0.91})
        parent.log_artifact(report)
        version = parent.register_model(model_dir, tags={"trainguard.model_sha256": SHA})

    client = MlflowClient(mlflow_uri)
    parent_run = client.get_run(parent.run_id)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.params["trainer.init_args.max_epochs"] == str(config.trainer.arg("max_epochs"))
    assert parent_run.data.params["model.class_path"] == "digits_demo.models.DigitsClassifier"
    assert parent_run.data.tags["mlflow.source.git.commit"] == "abc"
    assert parent_run.data.tags["trainguard.signer_keyids"] == "k1,k2"
    assert parent_run.data.tags["trainguard.manifest.train.sha256"] == SHA
    children = client.search_runs(
        [parent_run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'"
    )
    assert sorted(run.info.run_name for run in children) == ["gate", "training", "verification"]
    assert len(client.get_metric_history(training.run_id, "b")) == 300
    assert "train/loss" in client.get_run(training.run_id).data.metrics
    verified = client.get_run(verification.run_id)
    assert verified.data.metrics["verify/failed"] == 1
    (dataset_input,) = verified.inputs.dataset_inputs
    assert {t.key: t.value for t in dataset_input.tags}["trainguard.sha256"] == SHA
    assert "report.json" in [a.path for a in client.list_artifacts(parent.run_id)]
    assert version == "1"
    (registered_version,) = client.search_model_versions(f"name = '{registered}'")
    assert registered_version.run_id == parent.run_id and registered_version.tags["trainguard.model_sha256"] == SHA


def test_a_failing_block_marks_the_run_failed_and_nothing_is_registered(mlflow_uri: str) -> None:
    experiment, registered = _names()
    tracker = CycleTracker.connect(experiment, registered)
    with pytest.raises(RuntimeError), tracker.cycle("cycle-1") as parent, parent.stage("gate"):
        raise RuntimeError("training crashed")
    client = MlflowClient(mlflow_uri)
    assert client.get_run(parent.run_id).info.status == "FAILED"
    assert client.search_model_versions(f"name = '{registered}'") == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _exercise(tracker: CycleTracker, tmp_path: Path) -> list[str]:
    done = []
    with tracker.cycle("cycle", params={"a": 1}) as parent:
        with parent.stage("training") as training:
            training.log_metrics({"x": 1.0})
            training.log_datasets([DatasetRef("d", SHA, "file:///d")])
            done.append("trained")
        parent.log_dict({"k": 1}, "report.json")
        assert parent.register_model(tmp_path) is None
        done.append("decided")
    return done


def test_an_unreachable_server_switches_to_offline_and_the_cycle_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    tracker = CycleTracker.connect("exp", "model")
    assert tracker.offline and "unreachable" in tracker.offline_reason
    assert _exercise(tracker, tmp_path) == ["trained", "decided"]


@pytest.fixture
def healthy_but_broken_server() -> Iterator[str]:
    """A server whose /health says OK but whose API answers 404, as behind a misrouted proxy."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK" if self.path == "/health" else b"{}")

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_server_failing_after_the_probe_also_switches_offline(
    healthy_but_broken_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", healthy_but_broken_server)
    tracker = CycleTracker.connect("exp", "model")
    assert tracker.offline and "open the experiment" in tracker.offline_reason
    assert _exercise(tracker, tmp_path) == ["trained", "decided"]


def test_the_default_uri_is_local_sqlite_and_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri() == "sqlite:///mlruns.db"
    assert resolve_tracking_uri("http://configured") == "http://configured"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env")
    assert resolve_tracking_uri("http://configured") == "http://env"


def test_params_are_flattened_and_cut_to_mlflow_limits() -> None:
    flat = flatten_params({"training": {"eps": [0.1, 0.2], "name": "x" * 7000}, "empty": {}, "none": None})
    assert flat["training.eps"] == "[0.1, 0.2]"
    assert len(flat["training.name"]) == 6000 and flat["training.name"].endswith("...")
    assert flat["empty"] == "{}" and flat["none"] == "null"
