"""`trainguard cycle` under torchrun: rank 0 verifies, screens, gates and signs; rank 1 trains its share of the plan
rank 0 shares; one read log, one attestation; a cycle rank 0 stops ends every rank with its reason, never a hang."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from digits_demo.demo import create_keys, sign_contributions, sign_trusted
from digits_demo.prepare import prepare_digits
from digits_demo.threats import tamper_file

from trainguard.defenses.heldout import HeldoutMetrics, LabeledData
from trainguard.pipeline.config import CycleConfig, load_config
from trainguard.pipeline.distributed import Launch, launch_from_env
from trainguard.pipeline.errors import CycleAbortedError
from trainguard.pipeline.intake import concat, verify_and_read
from trainguard.pipeline.plan import TrainingPlan
from trainguard.provenance.allowlist import AllowList
from trainguard.provenance.rollback import RollbackRecords
from trainguard.ranks import decode, encode

REPO = Path(__file__).resolve().parents[2]


def test_the_launch_is_read_from_torchrun_or_slurm_and_a_world_of_one_runs_alone() -> None:
    assert launch_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Launch(1, 2, 1)
    assert launch_from_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}) == Launch(3, 4, 1)
    assert launch_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert launch_from_env({}) is None


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    keys, data = tmp_path / "demo-work" / "keys", tmp_path / "demo-work" / "data"
    create_keys(keys)
    contributed = prepare_digits(data).contributed()
    sign_trusted(data, keys)
    sign_contributions(data, keys, contributed)
    config = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())
    config["project"] = str(REPO / "examples")  # the digits example, wherever this copy is written
    config["training"].update(bootstrap_epochs=15)
    config["trainer"]["init_args"].update(max_epochs=2, strategy="ddp", devices=2, accelerator="cpu")
    config["robust_eval"].update(subset_size=50, steps=2)
    config["gate"].update(min_clean_accuracy=0.5, min_robust_accuracy=0.0, max_accuracy_drop=0.2, max_class_drop=0.3)
    config["tracking"] = {"experiment_name": "distributed", "registered_model_name": "distributed"}
    (tmp_path / "cycle.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def _torchrun(project: Path, tracking: str) -> subprocess.CompletedProcess[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        "-m",
        "trainguard.pipeline.cli",
        "cycle",
        "--config",
        "cycle.yaml",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=600)


def test_a_cycle_rank_zero_stops_ends_every_rank_with_its_reason(project: Path, mlflow_server: str) -> None:
    tamper_file(project / "demo-work" / "data" / "trusted" / "base.parquet")
    done = _torchrun(project, mlflow_server)
    assert done.returncode != 0
    assert "rank 0 stopped the cycle: " in done.stderr and "digest-mismatch" in done.stderr
    assert not (project / "demo-work" / "cycle" / "models").exists()


def test_a_ddp_config_runs_its_ranks_with_one_read_log_and_one_signed_model(project: Path, mlflow_server: str) -> None:
    """Started plainly, the cycle relaunches itself as two ranks under torch's launcher."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "trainguard"), "cycle", "--config", "cycle.yaml"]
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "trained its share" in done.stdout and "cycle 1 accepted" in done.stdout
    cycle = project / "demo-work" / "cycle"
    assert sorted(p.name for p in (cycle / "models").iterdir()) == ["cycle-0001"]
    report = json.loads((cycle / "reports" / "cycle-0001.json").read_text())
    reads = [json.loads(line) for line in (cycle / "reads" / "cycle-0001.jsonl").read_text().splitlines()]
    allowed = {(a["manifest_sha256"], a["name"], a["sha256"]) for a in report["allow_list"]}
    assert {(r["manifest_sha256"], r["name"], r["sha256"]) for r in reads} == allowed
    assert len(reads) == len(allowed), "each shard read once across both ranks"


@pytest.fixture
def planned(project: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[CycleConfig, TrainingPlan]:
    """Rank 0's plan for the project's first cycle: its intake's manifests, every shard it read allowed."""
    monkeypatch.chdir(project)
    config = load_config(project / "cycle.yaml")
    intake = verify_and_read(config, RollbackRecords(), {})
    samples = concat(intake.holdout)
    holdout = LabeledData.of(samples.inputs, samples.targets, config.task.build())
    allow = AllowList.of(s.allowed for s in (*intake.trusted, *intake.train, *intake.holdout))
    nan = float("nan")
    previous = HeldoutMetrics(0.3, 0.9, (0.2, float("inf")), (0.95, nan))  # a class absent from the held-out set
    excluded = {intake.train[0].key: (0, 3)}
    return config, TrainingPlan(1, intake.manifests, allow, holdout, previous, ["pixel_00"], excluded)


def test_every_rank_rebuilds_the_plan_from_its_json_and_bytes_it_verifies_itself(
    planned: tuple[CycleConfig, TrainingPlan],
) -> None:
    config, plan = planned
    sent = decode(encode(plan.message()), 0)
    rebuilt = TrainingPlan.rebuilt(config, sent, {})
    assert [m.manifest_sha256 for m in rebuilt.manifests] == [m.manifest_sha256 for m in plan.manifests]
    assert rebuilt.allow == plan.allow and rebuilt.excluded_rows == plan.excluded_rows
    assert (rebuilt.cycle, rebuilt.columns) == (1, ["pixel_00"])
    assert torch.equal(rebuilt.holdout.x, plan.holdout.x) and torch.equal(rebuilt.holdout.y, plan.holdout.y)
    assert rebuilt.previous.class_loss[1] == float("inf") and math.isnan(rebuilt.previous.class_accuracy[1])
    assert rebuilt.previous.accuracy == 0.9


def test_a_rank_refuses_a_manifest_changed_since_rank_zero_verified_it(
    planned: tuple[CycleConfig, TrainingPlan],
) -> None:
    config, plan = planned
    sent = decode(encode(plan.message()), 0)
    manifest = plan.manifests[1].path
    manifest.write_bytes(manifest.read_bytes() + b"\n")  # still the same signed statement, other bytes
    with pytest.raises(CycleAbortedError, match=r"manifest-changed: sha256 \w+\.\.\. is not the \w+\.\.\. rank 0"):
        TrainingPlan.rebuilt(config, sent, {})


def test_a_rank_refuses_a_held_out_shard_that_is_not_the_one_allowed(planned: tuple[CycleConfig, TrainingPlan]) -> None:
    config, plan = planned
    sent = decode(encode(plan.message()), 0)
    tamper_file(config.dataset.holdout.data_dir / "holdout.parquet")
    with pytest.raises(CycleAbortedError, match=r"holdout\.parquet.*digest-mismatch|digest-mismatch.*holdout"):
        TrainingPlan.rebuilt(config, sent, {})


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda m: m | {"pickle": "gASV"}, "pickle: Extra inputs are not permitted"),
        (lambda m: m | {"cycle": "1"}, "cycle: Input should be a valid integer"),
        (lambda m: m | {"allow": [{"name": "x"}]}, "allow-list entry 0: expected an object with exactly"),
        (lambda m: m | {"excluded_rows": {"k": [-1]}}, "excluded_rows.k.0: Input should be greater than or equal"),
    ],
    ids=["extra-key", "string-cycle", "allow-entry", "negative-row"],
)
def test_a_malformed_plan_is_refused_in_one_line(planned: tuple[CycleConfig, TrainingPlan], change, where) -> None:
    config, plan = planned
    with pytest.raises(CycleAbortedError) as refused:
        TrainingPlan.rebuilt(config, change(decode(encode(plan.message()), 0)), {})
    assert where in str(refused.value) and "\n" not in str(refused.value)
    assert refused.value.check == "rank-message"
