"""`trainguard cycle` under torchrun: rank 0 verifies, screens, gates and signs; rank 1 trains its share of the plan
rank 0 shares; one read log, one attestation; a cycle rank 0 stops ends every rank with its reason, never a hang."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from digits_demo.demo import create_keys, sign_contributions, sign_trusted
from digits_demo.prepare import prepare_digits
from digits_demo.threats import tamper_file

from trainguard.pipeline.distributed import Launch, launch_from_env

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
