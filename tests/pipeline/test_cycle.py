"""Two consecutive defended cycles against a real MLflow server: the second brings a poisoned source and a shard
tampered after signing; everything is read back through MlflowClient and checked on disk."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, is_typeddict

import mlflow
import pytest
import yaml
from digits_demo.demo import create_keys, sign_contributions, sign_trusted
from digits_demo.prepare import prepare_digits
from digits_demo.threats import poison_shards, tamper_file

from tests.pipeline.conftest import DigitsProject
from trainguard.pipeline.attestation import cycle_record
from trainguard.pipeline.cycle import CycleOutcome, run_cycle
from trainguard.pipeline.cycle_report import CycleReportDict
from trainguard.pipeline.errors import CycleAbortedError, PreflightError
from trainguard.provenance.merkle import merkle_root, shard_leaves

REPO = Path(__file__).resolve().parents[2]
TRAINGUARD = str(Path(sys.executable).parent / "trainguard")


def _config(workdir: Path, config: dict[str, Any]) -> Path:
    """Writes a test cycle's config (the `cycle_config` fixture's) where the cycle runs."""
    path = workdir / "cycle.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _mismatches(value: Any, hint: Any, where: str = "report") -> list[str]:
    """Where `value` (a report read back from JSON) departs from its declared type `hint`: a key missing, one not
    declared, or a value of another type (a JSON number may be an int where a float is declared)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (Any, object):
        return []
    if is_typeddict(hint):
        if not isinstance(value, dict):
            return [f"{where}: {type(value).__name__}, not an object"]
        hints = typing.get_type_hints(hint, include_extras=True)
        found = [f"{where}: {key!r} is not declared" for key in value if key not in hints]
        for key, declared in hints.items():
            optional = typing.get_origin(declared) is NotRequired
            declared = typing.get_args(declared)[0] if optional else declared
            if key in value:
                found += _mismatches(value[key], declared, f"{where}.{key}")
            elif not optional:
                found.append(f"{where}: required {key!r} is missing")
        return found
    if origin in (typing.Union, types.UnionType):
        each = [_mismatches(value, arg, where) for arg in args]
        return [] if any(not found for found in each) else [f"{where}: {value!r} is none of {args}"]
    if origin in (list, Sequence):
        if not isinstance(value, list):
            return [f"{where}: {type(value).__name__}, not a list"]
        return [m for i, item in enumerate(value) for m in _mismatches(item, args[0], f"{where}[{i}]")]
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            return [f"{where}: {type(value).__name__}, not an object"]
        return [m for key, item in value.items() for m in _mismatches(item, args[1], f"{where}.{key}")]
    if hint is type(None):
        return [] if value is None else [f"{where}: {value!r} is not null"]
    allowed = (int, float) if hint is float else (hint,)
    if isinstance(value, bool) != (hint is bool) or not isinstance(value, allowed):
        return [f"{where}: {value!r} is not {hint.__name__}"]
    return []


def _contributed(data: Path, source: str, batch: int, extension: str = ".parquet") -> list[Path]:
    return sorted((data / "train" / source).glob(f"b{batch}-shard-*{extension}"))


@dataclass(frozen=True)
class FirstCycle:
    """A signed digits project (the `workdir` layout) whose first cycle, logged to the session's MLflow server as
    experiment cycle-e2e, accepted and signed a model: where it ran and its outcome (paths relative to it)."""

    root: Path
    outcome: CycleOutcome


@pytest.fixture(scope="module")
def first_cycle(
    mlflow_server: str, tmp_path_factory: pytest.TempPathFactory, cycle_config: Callable[..., dict[str, Any]]
) -> FirstCycle:
    """One first cycle for the tests that go on from it, each in its own copy (`first_project`); the working
    directory, the environment and MLflow's process-wide URIs are put back afterwards, as for one test."""
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    root = tmp_path_factory.mktemp("first-cycle")
    uris = tracking._tracking_uri, registry._registry_uri
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        patch.setenv("TRAINGUARD_HOME", str(root / "trainguard-home"))
        DigitsProject.laid_out(root).sign()
        try:
            outcome = run_cycle(_config(root, cycle_config("cycle-e2e")))
        finally:
            tracking._tracking_uri, registry._registry_uri = uris
    return FirstCycle(root, outcome)


@pytest.fixture
def first_project(first_cycle: FirstCycle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str) -> Path:
    """A copy of the first cycle's project, the directory the test runs in (its config, cycle.yaml, logs to the
    session's MLflow server as cycle-e2e)."""
    copy = tmp_path / "project"
    shutil.copytree(first_cycle.root, copy, symlinks=True)
    monkeypatch.chdir(copy)
    return copy


def test_two_cycles_refuse_tampered_and_poisoned_shards_and_log_everything(
    first_cycle: FirstCycle, first_project: Path, mlflow_uri: str, read_cycle_state: Any
) -> None:
    workdir, config = first_project, first_project / "cycle.yaml"
    data = workdir / "demo-work" / "data"

    first = first_cycle.outcome
    assert first.status == "accepted", first.reason
    assert all(d.accepted for d in first.shards), [d for d in first.shards if not d.accepted]

    contributed = prepare_digits(data, batch=1).contributed()
    contributed |= {f"{source}/": source for source in set(contributed.values())}  # batch 0's shards too
    poisoned = _contributed(data, "dave", 1)
    poison_shards(poisoned, 0.3, seed=3)
    sign_contributions(data, workdir / "demo-work" / "keys", contributed)
    tampered = _contributed(data, "carol", 1)[0]
    tamper_file(tampered)

    second = run_cycle(config)
    decisions = {d.shard.split(":", 1)[1]: d for d in second.shards}
    tampered_name = tampered.relative_to(data / "train").as_posix()
    assert decisions[tampered_name].check == "verify" and not decisions[tampered_name].accepted
    assert "digest-mismatch" in decisions[tampered_name].reason
    for path in poisoned:  # the detectors flag dave's rows and refuse his source (the default action) before RONI
        decision = decisions[path.relative_to(data / "train").as_posix()]
        assert (decision.check, decision.accepted) == ("detection", False), decision
        assert decision.reason.startswith("source dave: ") and "flagged" in decision.reason
    clean_new = [n for n, d in decisions.items() if n.split("/")[0] in ("alice", "bob") and "/b1-" in n]
    assert clean_new and all(decisions[n].accepted for n in clean_new)
    batch0 = {n: d for n, d in decisions.items() if "/b0-" in n}
    kept = [d for n, d in batch0.items() if not n.startswith("dave/")]
    assert kept and all(d.accepted for d in kept), "cycle 1's accepted shards are not screened again"
    dropped = [d for n, d in batch0.items() if n.startswith("dave/")]
    assert dropped and all(  # cycle 1 accepted them; now dave's source is flagged, so they go too
        (d.check, d.accepted) == ("detection", False) and d.reason.startswith("source dave: ") for d in dropped
    )
    (dave,) = [line for line in second.sources if line.startswith("dave ")]  # one line for all its shards
    assert dave.startswith("dave refused: ") and "label detector: " in dave and " rows look mislabelled" in dave
    assert "Fix: review the source's flagged rows" in dave, dave  # RONI's words: tests/pipeline/test_source_lines.py
    (carol,) = [line for line in second.sources if line.startswith("carol ")]
    assert carol.startswith("carol 1 of 6 shards refused: signature or read check: its bytes differ from the signed")
    assert "Fix: re-sign" in carol and "blake3" not in carol  # the digests stay in the report

    client = mlflow.MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("cycle-e2e")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2
    for parent, status in zip(parents, ("accepted", second.status), strict=True):
        children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert {"verification", "screening", "training", "gate"} <= children
        assert parent.data.params["trainer.init_args.max_epochs"] == "2"
        assert parent.data.tags["trainguard.status"] == status
        assert any(a.path == "report" for a in client.list_artifacts(parent.info.run_id))
        assert any(t.startswith("trainguard.manifest.") for t in parent.data.tags)
    screening = next(
        r
        for r in runs
        if r.info.run_name == "screening" and r.data.tags["mlflow.parentRunId"] == parents[1].info.run_id
    )
    # the detectors refused every shard of dave's (new and earlier) before RONI; RONI refused none of the rest
    assert screening.data.metrics["detection/rejected_shards"] == len(poisoned) + len(dropped)
    assert screening.data.metrics["roni/rejected"] == 0
    table = client.load_table(experiment.experiment_id, "roni/decisions.json", run_ids=[screening.info.run_id])
    assert table["accepted"].all() and not any(name.startswith("dave/") for name in table["name"])
    training = next(
        r for r in runs if r.info.run_name == "training" and r.data.tags["mlflow.parentRunId"] == parents[1].info.run_id
    )
    assert "val/acc" in training.data.metrics
    assert any(k.startswith("val/robust_acc") for k in training.data.metrics)
    versions = client.search_model_versions("name='cycle-e2e'")
    assert len(versions) == (2 if second.status == "accepted" else 1)

    report = json.loads(second.report.read_text())
    assert report["status"] == second.status
    for written in (json.loads(first.report.read_text()), report):  # the report's keys and values as typed
        assert _mismatches(written, CycleReportDict) == [], "\n".join(_mismatches(written, CycleReportDict))
    assert "detectors" in report["detection"] and "sources" in report["roni"], "the sections checked hold rows"
    assert list(table["name"]) == [d["name"] for d in report["roni"]["decisions"]]
    assert all(0 < p <= 1 for p in table["p_value"])
    assert report["detection"]["flagged_sources"] == ["dave"] and report["roni"]["flagged_sources"] == []
    sources = client.load_table(experiment.experiment_id, "roni/sources.json", run_ids=[screening.info.run_id])
    assert len(sources) and not sources["flagged"].any()
    assert report["training"]["read_log"]["entries"] > 0
    state = read_cycle_state(workdir)
    assert [c["status"] for c in state["cycles"]] == ["accepted", second.status]


# Run by a fresh interpreter in an empty folder, without PYTHONPATH: neither the project nor examples/ is on its path.
_LOAD_ELSEWHERE = """
import json, sys
import mlflow.pyfunc
import numpy as np

rows = np.asarray(json.loads(sys.argv[1]), dtype=np.float32)
served = mlflow.pyfunc.load_model("models:/cycle-e2e@champion").predict(rows)
import trainguard

verified = trainguard.load_model("cycle-e2e", key=sys.argv[2]).predict(rows)
code = sys.modules["digits_demo"].__file__  # imported by the loaders, from the model's verified code/
print(json.dumps({"served": served.to_dict("list"), "verified": verified.to_dict("list"), "code": code}))
"""


def test_the_champion_loads_in_a_fresh_process_outside_the_project_with_either_loader(
    first_cycle: FirstCycle, first_project: Path, tmp_path: Path, mlflow_uri: str
) -> None:
    """The champion's own code (digits_demo) travels signed with it: a process that never saw the project loads it
    through `mlflow.pyfunc` and through `trainguard.load_model`, and both predict what it predicts here."""
    import numpy as np

    import trainguard

    public = first_project / "demo-work" / "keys" / "model.pub"
    rows = np.random.default_rng(0).random((6, 64), dtype=np.float32)
    here = trainguard.load_model("cycle-e2e", key=public).predict(rows)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"MLFLOW_TRACKING_URI": mlflow_uri}
    command = [sys.executable, "-c", _LOAD_ELSEWHERE, json.dumps(rows.tolist()), str(public)]
    done = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert loaded["served"]["label"] == loaded["verified"]["label"] == here["label"].tolist()
    assert np.allclose(loaded["verified"]["probability"], here["probability"], atol=1e-6)
    assert not Path(loaded["code"]).is_relative_to(REPO), loaded["code"]  # the verified copy of the signed code/


def test_signed_model_verifies_and_a_swapped_model_is_refused(first_cycle: FirstCycle, first_project: Path) -> None:
    outcome = first_cycle.outcome  # the first cycle's, its model in this copy at the same relative path
    assert outcome.status == "accepted" and outcome.model_dir is not None
    model_dir = first_project / outcome.model_dir
    public = first_project / "demo-work" / "keys" / "model.pub"
    attestation = model_dir / "attestation.intoto.json"
    command = [
        TRAINGUARD,
        "verify-model",
        str(model_dir),
        "--attestation",
        str(attestation),
        "--key",
        str(public),
    ]
    assert subprocess.run(command, capture_output=True, text=True, timeout=120).returncode == 0

    payload = base64.b64decode(json.loads(attestation.read_text())["payload"])
    signed = json.loads(base64.b64decode(json.loads((model_dir / "model.sig").read_text())["dsseEnvelope"]["payload"]))
    assert [subject["name"] for subject in signed["subject"]] == [model_dir.name]  # the released directory's name
    from model_signing._signing import sign_ec_key, sign_sigstore_pb  # its key verifier reads Sigstore bundles

    bundle = sign_sigstore_pb.Signature.read(model_dir / "attestation.intoto.sigstore.json")
    assert sign_ec_key.Verifier(public)._verify_signed_content(bundle)[1] == payload

    statement = json.loads(payload)
    dependencies = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert any(d.get("name") == "digits-contributed" for d in dependencies)
    record = json.dumps(statement)
    assert "readLog" in record

    weights = model_dir / "model.safetensors"
    swapped = bytearray(weights.read_bytes())
    swapped[-1] ^= 0x01
    weights.write_bytes(bytes(swapped))
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "model" in done.stderr


def test_a_manifest_signed_by_an_untrusted_key_stops_the_cycle_before_training(
    workdir: Path, cycle_config: Callable[..., dict[str, Any]]
) -> None:
    config = _config(workdir, cycle_config("cycle-untrusted"))
    keys = workdir / "demo-work" / "keys"
    shutil.copy(keys / "curator.pub", keys / "owner.pub")  # the trust anchor no longer matches the owner's key
    with pytest.raises(PreflightError, match=r"dataset\.training\[1\]\.manifest: .*(untrusted|signature|threshold)"):
        run_cycle(config)
    assert not (workdir / "demo-work" / "cycle").exists()  # refused before the cycle began: no state, no report


def test_an_unreachable_tracking_server_still_decides_and_keeps_the_local_report(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, read_cycle_state: Any, cycle_config: Callable[..., dict[str, Any]]
) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    outcome = run_cycle(_config(workdir, cycle_config("cycle-offline")))
    assert outcome.status == "accepted" and outcome.model_dir is not None
    assert "unreachable" in outcome.tracking
    report = json.loads(outcome.report.read_text())
    assert report["status"] == "accepted" and "unreachable" in report["tracking"]
    state = read_cycle_state(workdir)
    assert state["accepted_model"]["path"] == str(outcome.model_dir)


def test_a_newer_manifest_put_in_place_after_screening_is_never_read(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str, cycle_config: Callable[..., dict[str, Any]]
) -> None:
    """Training reads through the statements the intake verified: a validly signed newer manifest that adds an
    unscreened shard, swapped in between screening and training, contributes nothing."""
    import trainguard.pipeline.cycle.orchestration as cycle_module

    data = workdir / "demo-work" / "data"
    manifest = data / "train.manifest.json"
    verified_digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    smuggled = data / "train" / "dave" / "smuggled.parquet"
    screen = cycle_module._screen

    def screen_then_swap(*args: Any, **kwargs: Any) -> None:
        screen(*args, **kwargs)
        shutil.copy(_contributed(data, "alice", 0)[0], smuggled)
        poison_shards([smuggled], 1.0, seed=5)
        sources = {p.relative_to(data / "train").as_posix(): p.parent.name for p in (data / "train").rglob("*.parquet")}
        sign_contributions(data, workdir / "demo-work" / "keys", sources)

    monkeypatch.setattr(cycle_module, "_screen", screen_then_swap)
    outcome = run_cycle(_config(workdir, cycle_config("cycle-swap")))
    assert hashlib.sha256(manifest.read_bytes()).hexdigest() != verified_digest, "the swap happened"
    reads = [json.loads(line) for line in (workdir / "demo-work" / "cycle" / "reads" / "cycle-0001.jsonl").open()]
    assert reads and {r["manifest_sha256"] for r in reads if r["dataset"] == "digits-contributed"} == {verified_digest}
    assert hashlib.sha256(smuggled.read_bytes()).hexdigest() not in {r["sha256"] for r in reads}
    assert outcome.status == "accepted"
    statement = json.loads(
        base64.b64decode(json.loads((outcome.model_dir / "attestation.intoto.json").read_text())["payload"])
    )
    dependencies = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert {d["digest"]["sha256"] for d in dependencies if d.get("name") == "digits-contributed"} == {verified_digest}
    read = shard_leaves((f"{r['dataset']}:{r['name']}", r["sha256"]) for r in reads)
    assert cycle_record(statement)["data"]["allowed"]["merkleRoot"] == merkle_root(read).hex()
    byproduct = next(b for b in statement["predicate"]["runDetails"]["byproducts"] if b["name"] == "read-log")
    log_path = workdir / "demo-work" / "cycle" / "reads" / "cycle-0001.jsonl"
    assert byproduct["uri"] == log_path.resolve().as_uri()
    assert byproduct["digest"]["sha256"] == hashlib.sha256(log_path.read_bytes()).hexdigest()


def test_a_signed_but_undecodable_shard_is_refused_and_the_cycle_goes_on(
    workdir: Path, mlflow_uri: str, cycle_config: Callable[..., dict[str, Any]]
) -> None:
    data = workdir / "demo-work" / "data"
    garbage, pages = _contributed(data, "bob", 0)[:2]
    garbage.write_bytes(b"PAR1 this is not a parquet file PAR1")
    parquet = pages.read_bytes()
    pages.write_bytes(parquet[:4] + b"\xff" * 24 + parquet[28:])  # the footer reads; the pages raise pyarrow's OSError
    sources = {p.relative_to(data / "train").as_posix(): p.parent.name for p in (data / "train").rglob("*.parquet")}
    sign_contributions(data, workdir / "demo-work" / "keys", sources)
    outcome = run_cycle(_config(workdir, cycle_config("cycle-undecodable")))
    for broken in (garbage, pages):
        decision = next(d for d in outcome.shards if d.shard.endswith(broken.relative_to(data / "train").as_posix()))
        assert (decision.accepted, decision.check) == (False, "verify") and "format" in decision.reason
    assert outcome.status == "accepted"


def test_an_unexpected_error_ends_the_cycle_failed_with_a_one_line_reason(
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    read_cycle_state: Any,
    mlflow_uri: str,
    cycle_config: Callable[..., dict[str, Any]],
) -> None:
    (workdir / "exploding.py").write_text(
        "import pytorch_lightning as pl\n\n\n"
        "class Exploding(pl.Callback):\n"
        "    def on_train_start(self, trainer, module):\n"
        "        raise RuntimeError('the user callback broke\\non two lines')\n"
    )
    monkeypatch.syspath_prepend(str(workdir))
    config = _config(workdir, cycle_config("cycle-exploding"))
    document = yaml.safe_load(config.read_text())
    document["callbacks"] = [{"class_path": "exploding.Exploding"}]
    config.write_text(yaml.safe_dump(document))
    with pytest.raises(CycleAbortedError, match="RuntimeError: the user callback broke on two lines") as stopped:
        run_cycle(config)
    assert "\n" not in str(stopped.value)
    state = read_cycle_state(workdir)
    assert state["cycles"][-1]["status"] == "failed" and state["accepted_model"] is None
    report = json.loads((workdir / "demo-work" / "cycle" / "report.json").read_text())
    assert report["status"] == "failed" and report["failed_check"] == "internal"
    assert _mismatches(report, CycleReportDict) == []


def test_a_cycle_trains_a_cnn_on_webdataset_image_shards(
    tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch, cycle_config: Callable[..., dict[str, Any]]
) -> None:
    """The image demo's path: 8x8 PNG digits in WebDataset tars, one contributor poisoned before signing, one tar
    tampered after; the CNN trains on (N, 1, 8, 8) images decoded from verified bytes."""
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "digits-trust.yaml", tmp_path / "configs")
    keys, data = tmp_path / "demo-work" / "keys", tmp_path / "demo-work" / "data"
    create_keys(keys)
    contributed = prepare_digits(data, shard_format="images").contributed()
    poisoned = _contributed(data, "dave", 0, ".tar")
    poison_shards(poisoned, 0.3, seed=3)
    sign_trusted(data, keys)
    sign_contributions(data, keys, contributed)
    tampered = _contributed(data, "carol", 0, ".tar")[0]
    tamper_file(tampered)
    monkeypatch.chdir(tmp_path)
    outcome = run_cycle(_config(tmp_path, cycle_config("cycle-images", name="digits-images.yaml")))
    decisions = {d.shard.split(":", 1)[1]: d for d in outcome.shards}
    assert decisions[tampered.relative_to(data / "train").as_posix()].check == "verify"
    for path in poisoned:  # refused with dave's source by the detectors (the default action), before RONI
        assert decisions[path.relative_to(data / "train").as_posix()].check == "detection"
        assert not decisions[path.relative_to(data / "train").as_posix()].accepted
    assert outcome.status == "accepted", outcome.reason
    reads = (tmp_path / "demo-work" / "cycle" / "reads" / "cycle-0001.jsonl").read_text()
    assert "alice/b0-shard-00.tar" in reads and "base.tar" in reads
