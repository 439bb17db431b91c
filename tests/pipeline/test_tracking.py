"""MLflow tracking of a cycle against a real server, read back with MlflowClient (and `mlflow.pyfunc`,
`mlflow.data`); offline when unreachable."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.data
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from tests.defenses.conftest import screening_report
from trainguard.defenses.report import write_screening
from trainguard.defenses.roni import ScreeningConfig
from trainguard.pipeline.attestation import cycle_record
from trainguard.pipeline.config import load_config, resolve_tracking_uri
from trainguard.pipeline.model_sign import ATTESTATION_FILE
from trainguard.pipeline.tracking import CycleTracker, cycle_tags, dataset_source, flatten_params
from trainguard.provenance.merkle import inclusion_proof, merkle_root, shard_leaves, verify_inclusion
from trainguard.provenance.verify import VerificationReport

DIGITS = Path(__file__).resolve().parents[2] / "configs" / "digits.yaml"
SHA = "ab" * 32


def _names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"exp-{tag}", f"model-{tag}"


def _report(folder: Path) -> VerificationReport:
    """A verification report of a (pretend) manifest in `folder`, written there."""
    (folder / "train.manifest.json").write_text('{"pretend": "manifest"}')
    return VerificationReport(
        manifest_path=str(folder / "train.manifest.json"),
        data_dir=str(folder),
        manifest_sha256=SHA,
        dataset="train",
        version=1,
        statement_sha256=SHA,
        signers=("k1",),
        shards=14,
    )


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

    tracker = CycleTracker.connect(experiment, registered)
    assert not tracker.offline, tracker.offline_reason
    assert tracker.uri == mlflow_uri
    tags = cycle_tags("abc", {"train": SHA}, ["k2", "k1", "k2"])
    with tracker.cycle("cycle-1", params=config.resolved(), tags=tags) as parent:
        with parent.stage("verification") as verification:
            verification.log_datasets([_report(tmp_path)])
            verification.set_tags({"trainguard.manifest.train.sha256": SHA})
            verification.log_metrics({"verify/shards": 14, "verify/failed": 1})
        with parent.stage("training") as training:
            for step in range(300):  # 1,200 points: two log_batch calls, not 1,200 calls
                training.log_metrics({"a": step, "b": 2 * step, "c": 0.5, "d": 1.0}, step=step)
            _fit_briefly(training.lightning_logger())
        with parent.stage("gate") as gate:
            gate.log_metrics({"gate/clean_accuracy": 0.91})
        parent.log_artifact(report)

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
    assert verified.data.tags["trainguard.status"] == "done"
    (dataset_input,) = verified.inputs.dataset_inputs
    assert {t.key: t.value for t in dataset_input.tags}["trainguard.sha256"] == SHA
    source = mlflow.data.get_source(dataset_input)  # the manifest as logged, served by the tracking server
    assert source.url.startswith(f"{mlflow_uri}/api/2.0/mlflow-artifacts/artifacts/")
    (tmp_path / "loaded").mkdir()
    assert Path(source.load(str(tmp_path / "loaded"))).read_bytes() == (tmp_path / "train.manifest.json").read_bytes()
    assert "report.json" in [a.path for a in client.list_artifacts(parent.run_id)]


def test_a_screening_lands_in_its_run_as_a_summary_two_tables_and_the_local_files(
    mlflow_uri: str, tmp_path: Path
) -> None:
    experiment, registered = _names()
    files = write_screening(screening_report(), tmp_path / "cycle-1")
    tracker = CycleTracker.connect(experiment, registered)
    with tracker.cycle("cycle-1") as parent, parent.stage("screening") as screening:
        screening.log_screening(screening_report(), files)

    client = MlflowClient(mlflow_uri)
    run = client.get_run(screening.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {
        "roni/level": ScreeningConfig().level,
        "roni/candidates": 2.0,
        "roni/accepted": 1.0,
        "roni/rejected": 1.0,
        "roni/flagged_sources": 0.0,
        "roni/seconds": 0.1,
    }
    assert not any(k.startswith("roni.") for k in run.data.tags)
    assert run.data.params["roni.level"] == str(ScreeningConfig().level)
    assert run.data.params["roni.calibration_sizes"] == "50"
    table = client.load_table(run.info.experiment_id, "roni/decisions.json", run_ids=[screening.run_id])
    assert list(table["name"]) == ["shard-a", "shard-m"] and list(table["accepted"]) == [True, False]
    assert list(table["p_value"]) == [0.5, 0.002] and list(table["adjusted_p_value"]) == [0.5, 0.002]
    assert table["reason"][1].startswith("p-value 0.002 <= level")
    sources = client.load_table(run.info.experiment_id, "roni/sources.json", run_ids=[screening.run_id])
    assert list(sources["source"]) == ["alice"] and list(sources["flagged"]) == [False]
    artifacts = {a.path for a in client.list_artifacts(screening.run_id, "roni")}
    assert artifacts == {"roni/roni-report.json", "roni/roni-impacts.png", "roni/decisions.json", "roni/sources.json"}
    logged = client.download_artifacts(screening.run_id, "roni/roni-report.json", str(tmp_path))
    assert Path(logged).read_bytes() == files.json_path.read_bytes()


def test_a_failing_block_marks_the_run_failed_and_nothing_is_registered(mlflow_uri: str) -> None:
    experiment, registered = _names()
    tracker = CycleTracker.connect(experiment, registered)
    with pytest.raises(RuntimeError), tracker.cycle("cycle-1") as parent, parent.stage("gate") as gate:
        raise RuntimeError("training crashed")
    client = MlflowClient(mlflow_uri)
    assert client.get_run(parent.run_id).info.status == "FAILED"
    tags = client.get_run(gate.run_id).data.tags
    assert (tags["trainguard.status"], tags["trainguard.reason"]) == ("failed", "training crashed")
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
            training.log_datasets([_report(tmp_path)])
            training.log_table({"a": [1]}, "t.json")
            done.append("trained")
        with parent.stage("screening") as screening:
            screening.log_screening(screening_report(), write_screening(screening_report(), tmp_path / "roni"))
            done.append("screened")
        parent.log_dict({"k": 1}, "report.json")
        parent.finish("accepted", "ok", name="renamed")
        parent.register_model(None)  # type: ignore[arg-type]
        done.append("decided")
    return done


def test_an_unreachable_server_switches_to_offline_and_the_cycle_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    tracker = CycleTracker.connect("exp", "model")
    assert tracker.offline and "unreachable" in tracker.offline_reason
    assert _exercise(tracker, tmp_path) == ["trained", "screened", "decided"]
    assert json.loads((tmp_path / "roni" / "roni-report.json").read_text())["decisions"][1]["name"] == "shard-m"


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
    assert tracker.wait() is not None and "open the experiment" in tracker.offline_reason
    assert _exercise(tracker, tmp_path) == ["trained", "screened", "decided"]


def test_the_default_uri_is_local_sqlite_and_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri() == "sqlite:///mlflow.db"  # what `mlflow ui` opens by default
    assert resolve_tracking_uri("http://configured") == "http://configured"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env")
    assert resolve_tracking_uri("http://configured") == "http://env"


def test_a_dataset_source_is_the_dvc_remote_url_of_its_data_else_the_logged_manifest_served_over_http(
    dvc_repo: Path,
) -> None:
    from dvc.repo import Repo

    data = dvc_repo / "data"
    (data / "part").mkdir(parents=True)
    (data / "shard-0.parquet").write_bytes(b"rows")
    (data / "part" / "shard-1.parquet").write_bytes(b"more rows")
    repo = Repo(str(dvc_repo))
    repo.add(str(data))
    logged = "mlflow-artifacts:/1/run/artifacts/datasets/train/train.manifest.json"
    served = (
        "http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts/1/run/artifacts/datasets/train/train.manifest.json"
    )
    assert dataset_source(data, logged, "http://127.0.0.1:5000") == served  # no remote: DVC's answer is its cache
    with repo.config.edit() as config:  # as `dvc remote add -d store URL` (nothing is pushed: no network)
        config["remote"]["store"] = {"url": "https://data.example.org/dvc"}
        config["core"]["remote"] = "store"
    source = dataset_source(data, logged, "http://127.0.0.1:5000")
    assert source.startswith("https://data.example.org/dvc/files/md5/") and source.endswith(".dir")
    assert dataset_source(dvc_repo.parent, logged, "http://127.0.0.1:5000") == served  # not in a DVC repository
    (listing,) = (dvc_repo / ".dvc" / "cache").rglob("*.dir")
    listing.write_bytes(b'["a"]')  # a listing DVC cannot load: a folder inside the out has the out's URL
    assert dataset_source(data / "part", logged, "http://127.0.0.1:5000") == source
    with repo.config.edit() as config:  # a remote URL's credentials stay out of MLflow
        config["remote"]["store"] = {"url": "https://user:secret@data.example.org:8443/dvc"}
    with_port = source.replace("data.example.org", "data.example.org:8443")
    assert dataset_source(data, logged, "http://127.0.0.1:5000") == with_port


def test_params_are_flattened_and_cut_to_mlflow_limits() -> None:
    flat = flatten_params({"training": {"eps": [0.1, 0.2], "name": "x" * 7000}, "empty": {}, "none": None})
    assert flat["training.eps"] == "[0.1, 0.2]"
    assert len(flat["training.name"]) == 6000 and flat["training.name"].endswith("...")
    assert flat["empty"] == "{}" and flat["none"] == "null"


@dataclass(frozen=True)
class Released:
    """A real cycle's output, accepted and registered: where it ran, its config, outcome and MLflow names."""

    root: Path
    config: Path
    outcome: Any
    experiment: str


@pytest.fixture(scope="module")
def released(
    mlflow_server: str, tmp_path_factory: pytest.TempPathFactory, cycle_config: Callable[..., dict[str, Any]]
) -> Iterator[Released]:
    """One short digits cycle against the session's MLflow server (shared by the tests that read it back)."""
    import shutil

    import yaml
    from digits_demo.demo import create_keys, sign_contributions, sign_trusted
    from digits_demo.prepare import prepare_digits

    from trainguard.pipeline.cycle import run_cycle

    root = tmp_path_factory.mktemp("released")
    experiment, _ = _names()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        patch.setenv("TRAINGUARD_HOME", str(root / "home"))
        (root / "configs").mkdir()
        shutil.copy(DIGITS.parent / "digits-trust.yaml", root / "configs")
        keys, data = root / "demo-work" / "keys", root / "demo-work" / "data"
        create_keys(keys)
        contributed = prepare_digits(data).contributed()
        sign_trusted(data, keys)
        sign_contributions(data, keys, contributed)
        config = root / "cycle.yaml"
        config.write_text(yaml.safe_dump(cycle_config(experiment)))
        outcome = run_cycle(config)
        assert outcome.status == "accepted", outcome.reason
        yield Released(root, config, outcome, experiment)


def _parent(client: MlflowClient, released: Released) -> Any:
    experiment = client.get_experiment_by_name(released.experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.`trainguard.status` = 'accepted'")
    return next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)


def _holdout(released: Released) -> tuple[Any, Any]:
    import pandas as pd

    frame = pd.read_parquet(released.root / "demo-work" / "data" / "trusted" / "holdout.parquet")
    return frame.filter(like="pixel_").to_numpy(dtype="float32"), frame["label"].to_numpy()


def test_the_champion_loads_through_mlflow_pyfunc_verified_and_predicts(released: Released, mlflow_uri: str) -> None:
    import mlflow.pyfunc

    import trainguard

    model = mlflow.pyfunc.load_model(f"models:/{released.experiment}@champion")
    x, y = _holdout(released)
    predicted = model.predict(x)
    assert list(predicted.columns) == ["label", "probability"]
    assert (predicted["label"].to_numpy() == y).mean() > 0.5
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, 64)
    verification = model.unwrap_python_model().verification
    released_weights = (released.outcome.model_dir / "model.safetensors").read_bytes()
    assert verification.model_sha256 == hashlib.sha256(released_weights).hexdigest()
    key = released.root / "demo-work" / "keys" / "model.pub"
    again = trainguard.load_model(released.experiment, key=key)  # one call, trust anchored in the caller's key
    assert (again.predict(x[:20])["label"] == predicted["label"][:20]).all()

    client = MlflowClient(mlflow_uri)
    version = client.get_model_version_by_alias(released.experiment, "champion")
    assert (
        version.tags["trainguard.cycle"] == "1" and version.tags["trainguard.model_sha256"] == verification.model_sha256
    )
    assert "digits-contributed" in version.description and "screening" in version.tags["trainguard.checks"]
    assert version.source.startswith("models:/m-") and version.run_id == _parent(client, released).info.run_id
    description = client.get_registered_model(released.experiment).description
    assert description.startswith(f"`champion` is version {version.version}. Cycle 1 of `digits`, accepted by the gate")
    trusted = version.tags["trainguard.manifest.digits-trusted.sha256"]
    assert f"digits-trusted (manifest sha256 {trusted})" in description


def test_the_champion_is_a_logged_model_with_its_metrics_params_and_eval_dataset(
    released: Released, mlflow_uri: str
) -> None:
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(released.experiment).experiment_id
    (found,) = client.search_logged_models([experiment], filter_string="metrics.`val/acc` > 0.5")
    assert f"models:/{found.model_id}" == client.get_model_version_by_alias(released.experiment, "champion").source
    report = json.loads(released.outcome.report.read_text())
    assert report["model"]["registered_version"] == "1"
    metrics = {m.key: m for m in found.metrics}
    assert metrics["val/acc"].value == pytest.approx(report["metrics"]["val/acc"])
    holdout = next(i for i in _parent(client, released).inputs.dataset_inputs if i.dataset.name.endswith("-holdout"))
    assert {t.key: t.value for t in holdout.tags}["mlflow.data.context"] == "eval"
    assert (metrics["val/acc"].dataset_name, metrics["val/acc"].dataset_digest) == (
        holdout.dataset.name,
        holdout.dataset.digest,
    )
    assert metrics["shards/offered"].dataset_name is None  # the model's, not measured on the held-out set
    on_holdout = {"dataset_name": holdout.dataset.name, "dataset_digest": holdout.dataset.digest}
    assert [m.model_id for m in client.search_logged_models([experiment], datasets=[on_holdout])] == [found.model_id]
    assert found.params["trainer.init_args.max_epochs"] == "2" and found.params["model.class_path"].endswith(
        "DigitsClassifier"
    )


def test_loading_is_refused_after_a_weight_is_flipped(released: Released, mlflow_uri: str, tmp_path: Path) -> None:
    import mlflow.artifacts
    import mlflow.pyfunc

    from trainguard.pipeline.errors import ModelSignatureError

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{released.experiment}@champion", dst_path=str(tmp_path)))
    (weights,) = local.glob("data/trainguard/signed_model/model.safetensors")
    flipped = bytearray(weights.read_bytes())
    flipped[-1] ^= 0x01
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ModelSignatureError, match="signature check failed"):
        mlflow.pyfunc.load_model(str(local))


def test_the_parent_run_has_headline_metrics_a_parquet_decision_table_and_plots(
    released: Released, mlflow_uri: str
) -> None:
    client = MlflowClient(mlflow_uri)
    parent = _parent(client, released)
    report = json.loads(released.outcome.report.read_text())
    assert parent.data.metrics == pytest.approx(report["metrics"])  # the same names and numbers in both
    for name in ("val/acc", "val/robust_acc_eps0.1", "shards/offered", "shards/refused_roni", "roni/level"):
        assert name in parent.data.metrics
    assert parent.data.metrics["shards/offered"] == len(released.outcome.shards)
    assert not any(k.startswith("roni.") for k in parent.data.metrics)
    assert parent.info.run_name == "digits-cycle-1" and parent.data.tags["trainguard.reason"]
    work = released.outcome.report.parent.parent
    data = report["data"]
    local = work / data["decisions"]["path"]
    assert hashlib.sha256(local.read_bytes()).hexdigest() == data["decisions"]["sha256"]
    logged = Path(client.download_artifacts(parent.info.run_id, "shards/decisions.parquet", str(work / "download")))
    assert logged.read_bytes() == local.read_bytes()  # the file beside the report, not a JSON table
    table = pq.read_table(logged).to_pylist()
    assert table == [d.model_dump(mode="json") for d in released.outcome.shards]
    assert len(table) == data["decisions"]["rows"]
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {f"plots/{n}.png" for n in ("robust_accuracy", "gate_classes", "cycles")}
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["trainguard.status"] for c in children} == {"done"}
    screening = next(c for c in children if c.info.run_name == "screening")
    families = {name.split("/")[0] for name in screening.data.metrics}
    assert {"roni", "detection"} <= families
    for family in families:  # a compact summary each, not a metric per shard and class
        assert len([n for n in screening.data.metrics if n.startswith(f"{family}/")]) <= 12, family
    training = next(c for c in children if c.info.run_name == "training")
    assert "val/robust_acc_eps0.1" in training.data.metrics  # Lightning's logger keeps the name


def test_the_report_and_the_attestation_name_the_data_by_manifest_digests_and_merkle_roots(released: Released) -> None:
    """The report's and the attestation's roots are those of the parquet rows beside the report, and each allowed
    shard's inclusion proof verifies against the root (the report lists no shard)."""
    report = json.loads(released.outcome.report.read_text())
    work, data = released.outcome.report.parent.parent, report["data"]
    table = pq.read_table(work / data["decisions"]["path"]).to_pylist()
    accepted = shard_leaves((row["shard"], row["sha256"]) for row in table if row["accepted"])
    assert merkle_root(accepted).hex() == data["accepted"]["merkle_root"]
    assert data["accepted"]["shards"] == len(accepted)
    allowed = pq.read_table(work / data["allow_list"]["path"]).to_pylist()
    leaves = shard_leaves((f"{a['dataset']}:{a['name']}", a["sha256"]) for a in allowed)
    root = bytes.fromhex(data["allowed"]["merkle_root"])
    assert all(verify_inclusion(leaf, inclusion_proof(leaves, at), root) for at, leaf in enumerate(leaves))
    envelope = json.loads((released.outcome.model_dir / ATTESTATION_FILE).read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    attested = cycle_record(statement)["data"]
    assert attested["allowed"]["merkleRoot"] == data["allowed"]["merkle_root"]
    assert attested["accepted"]["merkleRoot"] == data["accepted"]["merkle_root"]
    assert attested["manifests"] == data["manifests"] and "allow_list" not in report


def test_every_dataset_input_resolves_from_another_machine_through_mlflow_data(
    released: Released, mlflow_uri: str, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_uri)
    inputs = client.get_run(_parent(client, released).info.run_id).inputs.dataset_inputs
    contexts = {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in inputs}
    assert contexts == {
        "digits-trusted": "training",
        "digits-contributed": "training",
        "digits-trusted-holdout": "eval",
    }
    for number, dataset_input in enumerate(inputs):
        source = mlflow.data.get_source(dataset_input)  # the manifest as logged, served by the tracking server
        assert dataset_input.dataset.source_type == "http" and source.url.startswith(f"{mlflow_uri}/api/2.0/")
        (tmp_path / str(number)).mkdir()
        manifest = Path(source.load(str(tmp_path / str(number)))).read_bytes()
        digest = json.loads(dataset_input.dataset.profile)["manifest_sha256"]
        assert digest == hashlib.sha256(manifest).hexdigest()
        assert dataset_input.dataset.digest == digest[:36]


def test_a_cycle_with_nothing_new_is_skipped_and_force_retrains(released: Released, mlflow_uri: str) -> None:
    from trainguard.pipeline.cycle import run_cycle

    client = MlflowClient(mlflow_uri)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(released.root)
        patch.setenv("TRAINGUARD_HOME", str(released.root / "home"))
        skipped = run_cycle(released.config)
        assert skipped.status == "skipped" and "nothing new since cycle 1" in skipped.reason
        assert len(client.search_model_versions(f"name = '{released.experiment}'")) == 1
        forced = run_cycle(released.config, force=True)
    assert forced.cycle == 2
    champion = client.get_model_version_by_alias(released.experiment, "champion")
    assert champion.version == ("2" if forced.status == "accepted" else "1")
    metrics = json.loads((released.root / "demo-work" / "cycle" / "metrics.json").read_text())
    assert metrics["cycle/number"] == 2 and all(isinstance(v, float | int) for v in metrics.values())
    cycles = json.loads((released.root / "demo-work" / "cycle" / "plots" / "cycles.json").read_text())
    assert [row["cycle"] for row in cycles] == [1, 2]


def test_a_failed_cycle_run_gets_its_own_name_and_status(released: Released, mlflow_uri: str, tmp_path: Path) -> None:
    import shutil

    from trainguard.pipeline.cycle import run_cycle
    from trainguard.pipeline.errors import CycleAbortedError

    root = tmp_path / "copy"
    shutil.copytree(released.root / "configs", root / "configs")
    shutil.copytree(released.root / "demo-work" / "data", root / "demo-work" / "data")
    shutil.copytree(released.root / "demo-work" / "keys", root / "demo-work" / "keys")
    trusted = sorted((root / "demo-work" / "data" / "trusted").rglob("*.parquet"))[0]
    tampered = bytearray(trusted.read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF  # passes the up-front checks (signatures), stops the cycle's verification
    trusted.write_bytes(bytes(tampered))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        with pytest.raises(CycleAbortedError):
            run_cycle(released.config)
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(released.experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.`trainguard.status` = 'failed'")
    (failed,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert failed.info.run_name == "digits-cycle-1-failed" and failed.info.status == "FAILED"
    (stage,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == failed.info.run_id]
    assert stage.info.run_name == "verification" and trusted.name in stage.data.tags["trainguard.reason"]
    assert failed.data.tags["trainguard.reason"] == stage.data.tags["trainguard.reason"]
