"""The Lightning callbacks under DDP: 2 CPU processes (gloo) with verification, adversarial training, robust
accuracy and the model gate on; both ranks must agree on metrics, the gate's decision, the verification results and
the final weights, and a tampered shard must stop both ranks before any training step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from digits_demo.prepare import Layout, prepare_digits

from tests.pipeline.launcher import run_ranks
from trainguard.provenance import errors as provenance_errors
from trainguard.provenance import generate_signing_key, load_verifying_key, sign_dataset, write_keypair, write_manifest
from trainguard.provenance.errors import ShardError

JOB = Path(__file__).with_name("ddp_job.py")
TIMEOUT = 240  # seconds; a hung collective must fail the test, not the suite
RANKS = (0, 1)
# 200 training rows (curator base + two contributed shards) and 100 held-out rows.
LAYOUT = Layout(sources=("alice",), shards_per_source=2, shard_size=50, holdout_size=100, base_size=100)
TAMPERED = "train/alice/b0-shard-01.parquet"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _signed_digits(root: Path) -> tuple[Path, Path]:
    """Digits shards under root/data, signed; returns the manifest and a trust policy granting its roles."""
    prepare_digits(root / "data", LAYOUT)
    key = generate_signing_key()
    write_keypair(key, root / "keys" / "curator")
    policy = root / "keys" / "trust.json"
    policy.write_text(json.dumps({"keys": ["curator.pub"], "roles": ["train", "trusted", "holdout"]}))
    envelope, _ = sign_dataset(
        root / "data",
        key,
        dataset="digits",
        source="curator",
        sources={"train/alice/": "alice"},
        roles={"trusted/holdout.parquet": "holdout"},
    )
    return write_manifest(envelope, root / "manifest.json"), policy


def _environment() -> dict[str, str]:
    """This machine only (loopback), no inherited cluster settings, one thread per rank."""
    inherited = ("SLURM_", "TORCHELASTIC_", "LSB_", "OMPI_", "PMI_")
    cluster = {"RANK", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "PL_GLOBAL_SEED"}
    env = {k: v for k, v in os.environ.items() if k not in cluster and not k.startswith(inherited)}
    return env | {
        "GLOO_SOCKET_IFNAME": "lo",
        "PL_DISABLE_FORK": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "examples"),  # ddp_job.py builds digits data
    }


@pytest.fixture(scope="module")
def launcher() -> Iterator[subprocess.Popen]:
    """`ddp_job.py --serve`: this module's jobs, their ranks forked from one process that imported torch,
    Lightning and trainguard once (a fresh interpreter per rank imports them again, ~8 CPU s each)."""
    server = subprocess.Popen(
        [sys.executable, str(JOB), "--serve"], env=_environment(), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    yield server
    server.stdin.close()
    server.wait(timeout=60)


def _run_job(
    launcher: subprocess.Popen, tmp_path: Path, manifest: Path, trust: Path, *options: str
) -> tuple[subprocess.CompletedProcess, Path]:
    """Runs the DDP job as two ranks that Lightning finds started for it (LOCAL_RANK, WORLD_SIZE and NODE_RANK, as
    its own launcher sets them), in a process group of its own; on timeout the whole group is killed."""
    out = tmp_path / "out"
    out.mkdir()
    argv = [str(out), str(manifest), str(tmp_path / "data"), str(trust), str(tmp_path / "state.json"), *options]
    env = _environment() | {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "TRAINGUARD_HOME": str(tmp_path / "trainguard-home"),
    }
    ranks = [
        {
            "env": {"LOCAL_RANK": str(rank), "NODE_RANK": "0", "WORLD_SIZE": str(len(RANKS))},
            "stdout": str(tmp_path / f"rank{rank}.stdout"),
            "stderr": str(tmp_path / f"rank{rank}.stderr"),
        }
        for rank in RANKS
    ]
    request = {"target": "job", "argv": argv, "cwd": str(tmp_path), "env": env, "ranks": ranks}
    returncode, killed = run_ranks(launcher, request, TIMEOUT)
    stdout, stderr = ("".join(Path(r[stream]).read_text() for r in ranks) for stream in ("stdout", "stderr"))
    if killed:
        pytest.fail(f"DDP job did not finish within {TIMEOUT} s (hung collective?)\n{stderr[-3000:]}")
    return subprocess.CompletedProcess([str(JOB), *argv], returncode, stdout, stderr), out


def _rank_documents(out: Path, result: subprocess.CompletedProcess) -> list[dict[str, Any]]:
    missing = [r for r in RANKS if not (out / f"rank{r}.json").exists()]
    assert not missing, f"ranks {missing} wrote no result (exit {result.returncode})\n{result.stderr[-3000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in RANKS]


def _without_timing(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k != "seconds"}


def test_ddp_ranks_agree_on_metrics_gate_verification_and_weights(launcher: subprocess.Popen, tmp_path: Path) -> None:
    manifest, trust = _signed_digits(tmp_path)
    result, out = _run_job(launcher, tmp_path, manifest, trust, "--epochs", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    zero, one = _rank_documents(out, result)
    assert (zero["rank"], one["rank"]) == RANKS and zero["world_size"] == one["world_size"] == 2
    assert zero["steps"] == one["steps"] > 0

    metrics = zero["callback_metrics"]
    assert {"train/loss", "val/acc", "adv/eps", "adv/success", "val/robust_acc_eps0.05"} <= metrics.keys()
    assert metrics.keys() == one["callback_metrics"].keys()
    for name, value in metrics.items():
        assert math.isclose(value, one["callback_metrics"][name], rel_tol=1e-5, abs_tol=1e-6), name

    # Each rank's gate holds a different held-out subset; the verdict is rank 0's measurement on every rank.
    assert zero["holdout_rows"] != one["holdout_rows"] and zero["local_holdout"] != one["local_holdout"]
    assert zero["verdict"] == one["verdict"]
    assert zero["verdict"]["after"] == zero["local_holdout"]
    assert zero["verdict"]["accepted"], zero["verdict"]["reason"]

    assert [_without_timing(r) for r in zero["reports"]] == [_without_timing(r) for r in one["reports"]]
    (report,) = zero["reports"]
    assert report["ok"] and report["failures"] == []
    assert report["shards"] == 4 and report["signers"] == [load_verifying_key(trust.parent / "curator.pub").keyid]
    assert report["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()

    shards = {path.relative_to(tmp_path / "data").as_posix() for path in (tmp_path / "data").rglob("*.parquet")}
    assert zero["read_log"] == one["read_log"] and sorted(zero["read_log"]) == sorted(shards)
    assert zero["read_log_sha256"] == one["read_log_sha256"]
    holdout = {name for name in shards if "holdout" in name}
    own = [set(zero["local_read_log"]) - holdout, set(one["local_read_log"]) - holdout]
    assert own[0] and own[1] and not own[0] & own[1], "each rank reads its own part of the training shards"
    assert own[0] | own[1] == shards - holdout

    assert zero["parameters_sha256"] == one["parameters_sha256"]
    assert (out / "model.safetensors").exists()


@pytest.mark.parametrize("copies", ["shared", "rank1"])
def test_ddp_tampered_shard_stops_both_ranks_before_training(
    launcher: subprocess.Popen, tmp_path: Path, copies: str
) -> None:
    """`shared`: both ranks read the tampered folder. `rank1`: each rank has its own copy of the shards (as nodes
    pulling from a DVC remote do) and only rank 1's is tampered: rank 0 must stop too, saying why, not hang."""
    manifest, trust = _signed_digits(tmp_path)
    options = ["--epochs", "1"]
    data = tmp_path / "data"
    if copies == "rank1":
        shutil.copytree(data, tmp_path / "data-rank1")
        data = tmp_path / "data-rank1"
        options += ["--rank1-data-dir", str(data)]
    shard = data / TAMPERED
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(content))

    result, out = _run_job(launcher, tmp_path, manifest, trust, *options)
    assert result.returncode == 1, result.stderr[-3000:]
    zero, one = _rank_documents(out, result)
    assert zero["steps"] == one["steps"] == 0
    # Each rank reads only its own part of the training shards: the rank that reads the tampered shard names it,
    # every other rank stops saying so.
    named = [d for d in (zero, one) if issubclass(getattr(provenance_errors, d["error_type"], Exception), ShardError)]
    assert named and all(TAMPERED in d["error"] for d in named), (zero, one)
    if copies == "rank1":
        assert named == [one]
    for document in (zero, one):
        if document not in named:
            assert document["error"] == "shard verification failed on another rank; training stopped"
    reasons = dict(re.findall(r"trainguard \(rank (\d)\): ([^\n]*)", result.stderr))
    assert reasons == {"0": zero["error"], "1": one["error"]}, result.stderr[-3000:]
    assert all("\n" not in d["error"] for d in (zero, one))
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (out / "model.safetensors").exists()


def test_ddp_a_changed_training_shard_is_refused_by_name_on_every_rank_and_training_goes_on(
    launcher: subprocess.Popen, tmp_path: Path
) -> None:
    """With `refuse_changed` (as the cycle trains), the rank that reads the changed shard refuses it; the ranks
    exchange their reads and refusals as JSON, so both hold the same refusal and a read log without the shard."""
    manifest, trust = _signed_digits(tmp_path)
    shard = tmp_path / "data" / TAMPERED
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 0xFF
    shard.write_bytes(bytes(content))

    result, out = _run_job(launcher, tmp_path, manifest, trust, "--epochs", "1", "--refuse-changed")
    assert result.returncode == 0, result.stderr[-3000:]
    zero, one = _rank_documents(out, result)
    assert zero["steps"] == one["steps"] > 0
    assert zero["refused"] == one["refused"] and [(r["name"], r["reason"]) for r in zero["refused"]] == [
        (TAMPERED, "digest-mismatch")
    ]
    assert zero["read_log"] == one["read_log"] and TAMPERED not in zero["read_log"]
    assert TAMPERED not in zero["local_read_log"] + one["local_read_log"]
