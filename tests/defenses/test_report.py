"""Screening records: local JSON and PNG first, then MLflow; a dead tracking server loses nothing."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

from mlflow import MlflowClient

from trainguard.defenses.conformal import Standardizer
from trainguard.defenses.report import record_screening
from trainguard.defenses.roni import (
    Calibration,
    CandidateDecision,
    ScreeningConfig,
    ScreeningReport,
    SourceDecision,
    Stratum,
)


def _report() -> ScreeningReport:
    def decision(name: str, source: str, impact: float, p: float, accepted: bool) -> CandidateDecision:
        reason = "p-value above level" if accepted else f"p-value {p} <= level 0.01: held-out margin pushed down"
        return CandidateDecision(
            name, source, 50, impact, (impact, math.nan), impact / 0.01, p, None, p, 50, accepted, reason
        )

    counts = (25, 25, *[0] * 8)
    calibration = Stratum(50, counts, Standardizer((0.0, 0.0), (0.01, 0.01)), (0.1, 0.5, 2.0), (0.0, 0.01, 0.02))
    alice = SourceDecision("alice", ("shard-a",), 50, None, None, 0.4, 3, 0.4, 0.8, False, "source alice not flagged")
    return ScreeningReport(
        decisions=(decision("shard-a", "alice", 0.01, 0.5, True), decision("shard-m", "mallory", 0.2, 0.002, False)),
        sources=(alice,),
        calibration=Calibration(0.5, 128, "full", strata=(calibration,)),
        config=ScreeningConfig(),
        seconds=0.1,
        base_soft_accuracy=0.9,
        head=None,
    )


def test_decisions_are_logged_to_mlflow_as_one_table_and_a_summary_and_kept_locally(
    mlflow_uri: str, tmp_path: Path
) -> None:
    outcome = record_screening(_report(), tmp_path / "cycle-1", experiment="roni-tests", run_name="cycle-1")
    assert outcome.logged_to_mlflow, outcome.mlflow_error
    local = json.loads(outcome.json_path.read_text())
    assert [d["accepted"] for d in local["decisions"]] == [True, False]
    assert local["decisions"][0]["class_impacts"] == [0.01, None]  # strict JSON: no Infinity/NaN
    assert outcome.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = MlflowClient(mlflow_uri)
    run = client.get_run(outcome.run_id)
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
    table = client.load_table(run.info.experiment_id, "roni/decisions.json", run_ids=[outcome.run_id])
    assert list(table["name"]) == ["shard-a", "shard-m"] and list(table["accepted"]) == [True, False]
    assert list(table["p_value"]) == [0.5, 0.002] and list(table["adjusted_p_value"]) == [0.5, 0.002]
    assert table["reason"][1].startswith("p-value 0.002 <= level")
    sources = client.load_table(run.info.experiment_id, "roni/sources.json", run_ids=[outcome.run_id])
    assert list(sources["source"]) == ["alice"] and list(sources["flagged"]) == [False]
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id, "roni")}
    assert artifacts == {"roni/roni-report.json", "roni/roni-impacts.png", "roni/decisions.json", "roni/sources.json"}
    logged = json.loads(
        Path(client.download_artifacts(outcome.run_id, "roni/roni-report.json", str(tmp_path))).read_text()
    )
    assert logged == local


def test_dead_tracking_server_keeps_the_local_report_and_says_so(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outcome = record_screening(_report(), tmp_path / "cycle-2", tracking_uri=f"http://127.0.0.1:{port}")
    assert not outcome.logged_to_mlflow
    assert outcome.mlflow_error is not None and "unreachable" in outcome.mlflow_error
    assert f"127.0.0.1:{port}" in outcome.mlflow_error
    assert json.loads(outcome.json_path.read_text())["decisions"][1]["name"] == "shard-m"
    assert outcome.plot_path.exists()


def test_the_local_report_never_follows_a_symlink_planted_at_its_temp_name(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder, victim = tmp_path / "cycle-3", tmp_path / "victim"
    folder.mkdir()
    victim.write_bytes(b"precious")
    (folder / ".roni-report.json.tmp").symlink_to(victim)
    outcome = record_screening(_report(), folder, tracking_uri=f"http://127.0.0.1:{port}")
    assert victim.read_bytes() == b"precious"
    assert json.loads(outcome.json_path.read_text())["decisions"][0]["name"] == "shard-a"
