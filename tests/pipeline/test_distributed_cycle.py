"""`trainguard cycle` as two ranks: rank 0 verifies, screens, gates and signs; rank 1 trains its share of the plan
rank 0 shares; one read log, one attestation; a cycle rank 0 stops ends every rank with its reason, never a hang; a
module logging torchmetrics metrics bootstraps on rank 0 alone without waiting for the others; a rank that never
arrives ends the cycle, named, within the configured timeout.

The launch is read by Lightning's cluster environments: torchrun's ranks, or the tasks `srun` starts in an `sbatch`
job; the batch step of such a job, or a launch the cycle cannot run as, is refused in one line before any work.

Started plainly, the cycle relaunches itself under torchrun, whose ranks are fresh interpreters (~9 CPU s each to
import torch, Lightning and MLflow); the other cycles here run their ranks with torchrun's or srun's environment,
forked from a launcher that imported those once (`launcher`)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from digits_demo.demo import create_keys, sign_contributions, sign_trusted
from digits_demo.prepare import Layout, prepare_digits
from digits_demo.threats import tamper_file
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

from tests.pipeline.launcher import run_ranks
from trainguard.defenses.heldout import HeldoutMetrics, LabeledData
from trainguard.pipeline.config import CycleConfig, load_config
from trainguard.pipeline.distributed import Launch, check_gpus, launch_from_env
from trainguard.pipeline.errors import CycleAbortedError, LaunchError
from trainguard.pipeline.intake import concat, verify_and_read
from trainguard.pipeline.plan import TrainingPlan
from trainguard.provenance.allowlist import AllowList
from trainguard.provenance.rollback import RollbackRecords
from trainguard.ranks import decode, encode

REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT = 240  # seconds: a hung collective fails the test instead of hanging the suite
METRICS_MODEL = textwrap.dedent(
    """
    import os
    import threading

    from torch.nn import functional as F
    from torchmetrics.classification import MulticlassAccuracy

    from digits_demo.models import DigitsClassifier


    class MetricsClassifier(DigitsClassifier):
        \"\"\"The usual Lightning idiom: torchmetrics Metric objects logged with self.log. `stall_rank` never
        returns from construction on that rank, as a rank stuck in user code.\"\"\"

        def __init__(self, channels: int = 8, lr: float = 0.02, stall_rank: int | None = None) -> None:
            super().__init__(channels, lr)
            if stall_rank is not None and os.environ.get("RANK") == str(stall_rank):
                threading.Event().wait()
            self.train_acc = MulticlassAccuracy(num_classes=10)
            self.val_acc = MulticlassAccuracy(num_classes=10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.train_acc(logits, y)
            self.log("train/acc_metric", self.train_acc, on_step=False, on_epoch=True)
            return F.cross_entropy(logits, y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.val_acc.update(self(x), y)
            self.log("val/acc_metric", self.val_acc, on_step=False, on_epoch=True)
    """
)


def _torchrun(rank: int, world: int, per_node: int, port: str) -> dict[str, str]:
    """The variables torchrun gives rank `rank` of `world` ranks, `per_node` to a node (its own store on rank 0)."""
    local, node = rank % per_node, rank // per_node
    return {
        **{"RANK": str(rank), "LOCAL_RANK": str(local), "ROLE_RANK": str(rank), "GROUP_RANK": str(node)},
        **{"WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(per_node), "ROLE_WORLD_SIZE": str(world)},
        **{"GROUP_WORLD_SIZE": str(world // per_node), "ROLE_NAME": "default", "MASTER_ADDR": "127.0.0.1"},
        **{"MASTER_PORT": port, "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "0"},
        **{"TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "False"},
    }


def _sbatch(tasks: int, nodes: str, job_id: str, *, nnodes: int = 1) -> dict[str, str]:
    """What `sbatch --ntasks=TASKS` gives its batch script (no --ntasks-per-node, so no SLURM_NTASKS_PER_NODE)."""
    return {
        **{"SLURM_JOB_ID": job_id, "SLURM_JOBID": job_id, "SLURM_JOB_NAME": "cycle", "SLURM_NTASKS": str(tasks)},
        **{"SLURM_NPROCS": str(tasks), "SLURM_NNODES": str(nnodes), "SLURM_JOB_NUM_NODES": str(nnodes)},
        **{"SLURM_NODELIST": nodes, "SLURM_JOB_NODELIST": nodes, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"},
        "SLURM_NODEID": "0",
    }


def _srun(batch: dict[str, str], rank: int, spread: str, local: int, node: int) -> dict[str, str]:
    """What `srun` adds for task `rank` of its step, whose tasks per node are `spread` (e.g. `2(x2)`)."""
    return batch | {
        **{"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node), "SLURM_STEP_ID": "0"},
        **{"SLURM_STEP_NUM_TASKS": batch["SLURM_NTASKS"], "SLURM_STEP_TASKS_PER_NODE": spread},
        **{"SLURM_STEP_NUM_NODES": batch["SLURM_NNODES"], "SLURM_STEP_NODELIST": batch["SLURM_NODELIST"]},
    }


CLUSTER = ("SLURM_", "TORCHELASTIC_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_")


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, str]], Launch | None]:
    """`launched(env)`: `launch_from_env()` in this process with `env` as its only cluster variables; what Lightning
    and the launch write to the environment (MASTER_ADDR, SLURM_NTASKS_PER_NODE, ...) is put back afterwards."""

    def launch(env: dict[str, str]) -> Launch | None:
        for name in [n for n in os.environ if n.startswith(CLUSTER)]:
            monkeypatch.delenv(name)
        for name in ("MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS_PER_NODE", *env):
            monkeypatch.setenv(name, env.get(name, ""))  # recorded, so that teardown restores it
            if name not in env:
                monkeypatch.delenv(name)
        return launch_from_env()

    return launch


def test_torchrun_ranks_are_read_from_its_elastic_environment_across_nodes(launched) -> None:
    launch = launched(_torchrun(rank=3, world=4, per_node=2, port="29511"))
    assert launch == Launch(3, 4, 1, 1, devices=2, num_nodes=2, address="127.0.0.1", port=29511, environment=None)
    assert isinstance(launch.environment, TorchElasticEnvironment)


def test_srun_ranks_take_rank_zeros_node_from_the_nodelist_and_its_port_from_the_job_id(launched) -> None:
    batch = _sbatch(4, "gpu[07-08]", "7123456", nnodes=2)
    launch = launched(_srun(batch, rank=3, spread="2(x2)", local=1, node=1))
    assert launch == Launch(3, 4, 1, 1, devices=2, num_nodes=2, address="gpu07", port=15000 + 3456, environment=None)
    assert isinstance(launch.environment, SLURMEnvironment)
    assert os.environ["MASTER_ADDR"] == "gpu07", "every Trainer in this process meets rank 0 there"


@pytest.mark.parametrize(
    "env",
    [{}, {"RANK": "0", "WORLD_SIZE": "1"}, _sbatch(1, "node01", "42")],
    ids=["no-launcher", "torchrun-world-of-one", "sbatch-one-task"],
)
def test_a_process_without_a_launcher_or_in_a_world_of_one_runs_alone(launched, env: dict[str, str]) -> None:
    assert launched(env) is None


@pytest.mark.parametrize(
    ("env", "refusal"),
    [
        (
            _sbatch(2, "node01", "42"),
            "SLURM allocated 2 tasks but this is the batch step: run `srun trainguard cycle …`",
        ),
        (
            _srun(_sbatch(3, "node[01-02]", "42", nnodes=2), 0, "2,1", 0, 0),
            "SLURM spread the step's 3 tasks unevenly over its nodes (2,1)",
        ),
        (
            _srun(_sbatch(2, "node01", "42"), 0, "1", 0, 0) | {"SLURM_STEP_NUM_TASKS": "1"},
            "this SLURM step runs 1 tasks, not the job's 2: run `srun trainguard cycle …`",
        ),
        (_torchrun(rank=0, world=3, per_node=2, port="29511"), "3 ranks do not make whole nodes of 2"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "WORLD_SIZE=2 but neither torchrun nor SLURM's srun started this process"),
    ],
    ids=["sbatch-batch-step", "srun-uneven", "srun-step-of-fewer-tasks", "torchrun-uneven", "unknown-launcher"],
)
def test_a_launch_the_cycle_cannot_run_as_is_refused_in_one_line(launched, env: dict[str, str], refusal: str) -> None:
    with pytest.raises(LaunchError) as refused:
        launched(env)
    assert str(refused.value).startswith(refusal) and "\n" not in str(refused.value)
    assert refused.value.exit_code == 2


def test_a_task_that_sees_only_its_own_gpu_is_refused_with_what_to_ask_slurm_for(launched) -> None:
    launch = launched(_srun(_sbatch(2, "node01", "42"), rank=1, spread="2", local=1, node=0))
    assert launch is not None
    check_gpus(launch, visible=2)
    with pytest.raises(LaunchError, match=r"^rank 1 sees 1 GPU\(s\) but 2 tasks .* `--gpus-per-node=2`"):
        check_gpus(launch, visible=1)


@pytest.fixture(scope="module")
def signed_project(tmp_path_factory: pytest.TempPathFactory, cycle_config: Callable[..., dict[str, Any]]) -> Path:
    """The digits demo's data with two contributors of two shards each (the demo has four of three): every stage of
    the test cycle runs, on half the rows to screen and train. Prepared and signed once; each test has a copy."""
    root = tmp_path_factory.mktemp("distributed-project")
    shutil.copytree(REPO / "configs", root / "configs")
    keys, data = root / "demo-work" / "keys", root / "demo-work" / "data"
    create_keys(keys)
    contributed = prepare_digits(data, Layout(sources=("alice", "bob"), shards_per_source=2)).contributed()
    sign_trusted(data, keys)
    sign_contributions(data, keys, contributed)
    ddp = {"trainer": {"init_args": {"strategy": "ddp", "devices": 2, "accelerator": "cpu"}}}
    (root / "cycle.yaml").write_text(yaml.safe_dump(cycle_config("distributed", ddp)))
    return root


@pytest.fixture
def project(signed_project: Path, tmp_path: Path) -> Path:
    """This test's own copy of the signed project (tests change its files and run cycles in it)."""
    shutil.copytree(signed_project, tmp_path, dirs_exist_ok=True)
    return tmp_path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def launcher() -> Iterator[subprocess.Popen[bytes]]:
    """`ddp_job.py --serve` (test_ddp.py's launcher): each cycle's ranks forked from one process that imported
    trainguard, Lightning, MLflow and torchmetrics once."""
    modules = ["trainguard.pipeline.cli", "trainguard.pipeline.cycle", "mlflow", "torchmetrics", "digits_demo.models"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "examples")}
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("ddp_job.py")), "--serve", *modules],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    yield server
    server.stdin.close()
    server.wait(timeout=60)


def _free_job_id() -> str:
    """A SLURM job id whose port (Lightning's: 15000 + its last four digits) is free here."""
    for last in random.sample(range(10000), 200):
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", 15000 + last))
            return f"9{last:04d}"
    raise RuntimeError("no free port in 15000-24999")


def _cycle_ranks(
    launcher: subprocess.Popen[bytes], project: Path, tracking: str, *options: str, started_by: str = "torchrun"
) -> tuple[subprocess.CompletedProcess[str], dict[int, str]]:
    """`trainguard cycle --config cycle.yaml *options` in `project` as two ranks with the environment their launcher
    gives them (`started_by`: torchrun, its own store on rank 0; or srun in an `sbatch --ntasks=2` job, which names
    no address or port), in a process group of its own, killed whole when it outlives JOB_TIMEOUT: the job's exit
    code (its ranks' worst), their stderr, rank 0's then rank 1's; and each rank's stdout."""
    world, port, job = 2, str(_free_port()), _sbatch(2, "localhost", _free_job_id())
    ranks = [
        {
            "env": _torchrun(rank, world, world, port) if started_by == "torchrun" else _srun(job, rank, "2", rank, 0),
            "stdout": str(project / f"rank{rank}.stdout"),
            "stderr": str(project / f"rank{rank}.stderr"),
        }
        for rank in range(world)
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "examples")}
    argv = ["cycle", "--config", "cycle.yaml", *options]
    request = {"target": "trainguard", "argv": argv, "cwd": str(project), "env": env, "ranks": ranks}
    returncode, killed = run_ranks(launcher, request, JOB_TIMEOUT)
    stderr = "".join(Path(rank["stderr"]).read_text() for rank in ranks)
    if killed:
        pytest.fail(f"the DDP cycle did not end within {JOB_TIMEOUT} s (a rank waits forever?)\n{stderr[-3000:]}")
    stdout = {rank: Path(ranks[rank]["stdout"]).read_text() for rank in range(world)}
    return subprocess.CompletedProcess(["trainguard", *argv], returncode, "".join(stdout.values()), stderr), stdout


def test_a_cycle_rank_zero_stops_ends_every_rank_with_its_reason(
    project: Path, mlflow_server: str, launcher: subprocess.Popen[bytes]
) -> None:
    tamper_file(project / "demo-work" / "data" / "trusted" / "base.parquet")
    done, _ = _cycle_ranks(launcher, project, mlflow_server)
    assert done.returncode != 0
    assert "rank 0 stopped the cycle: " in done.stderr and "digest-mismatch" in done.stderr
    assert not (project / "demo-work" / "cycle" / "models").exists()


@pytest.mark.parametrize(
    ("env", "refusal"),
    [
        (
            _sbatch(2, "node01", "42"),
            "SLURM allocated 2 tasks but this is the batch step: run `srun trainguard cycle …`",
        ),
        (
            _torchrun(rank=0, world=3, per_node=2, port="29511"),
            "3 ranks do not make whole nodes of 2: start as many on every node",
        ),
    ],
    ids=["sbatch-without-srun", "torchrun-uneven"],
)
def test_a_cycle_in_a_batch_step_or_an_uneven_launch_says_what_to_run_and_exits_2_before_any_work(
    project: Path, cli, env: dict[str, str], refusal: str
) -> None:
    """`trainguard cycle` in an `sbatch --ntasks=2` script without `srun`: one line, exit code 2, nothing done."""
    done = cli(project, "cycle", "--config", "cycle.yaml", env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [f"trainguard: error: {refusal}"]
    assert not (project / "demo-work" / "cycle").exists(), "refused before the cycle did anything"


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
    allow_list = pq.read_table(cycle / report["data"]["allow_list"]["path"]).to_pylist()
    allowed = {(a["manifest_sha256"], a["name"], a["sha256"]) for a in allow_list}
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


def _metrics_project(root: Path, rank_timeout: float | None = None, **model_args: object) -> Path:
    """A small digits project whose module logs torchmetrics metrics, with DDP on two CPU ranks (gloo): only what
    these tests need runs (no screening, no adversarial training, few epochs)."""
    shutil.copytree(REPO / "configs", root / "configs")
    keys, data = root / "demo-work" / "keys", root / "demo-work" / "data"
    create_keys(keys)
    layout = Layout(sources=("alice", "bob"), shards_per_source=1, shard_size=30, holdout_size=100, base_size=100)
    contributed = prepare_digits(data, layout).contributed()
    sign_trusted(data, keys)
    sign_contributions(data, keys, contributed)
    (root / "metrics_model.py").write_text(METRICS_MODEL)
    config = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())
    config["project"] = str(root)
    config["model"] = {"class_path": "metrics_model.MetricsClassifier", "init_args": model_args}
    config["training"].update(bootstrap_epochs=2, batch_size=32)
    if rank_timeout is not None:
        config["training"]["rank_timeout"] = rank_timeout
    config["trainer"]["init_args"].update(max_epochs=1, strategy="ddp", devices=2, accelerator="cpu")
    config["roni"]["enabled"] = False
    config["detectors"] = {"enabled": False}
    config["adversarial"]["enabled"] = False
    config["robust_eval"].update(eps=[0.0], subset_size=20, steps=1)
    config["gate"].update(min_clean_accuracy=0.0, min_robust_accuracy=0.0, max_accuracy_drop=1.0, max_class_drop=1.0)
    (root / "cycle.yaml").write_text(yaml.safe_dump(config))
    return root


def _dead_tracking() -> str:
    """A tracking URI nothing answers at."""
    return f"http://127.0.0.1:{_free_port()}"


def _job(project: Path, command: list[str]) -> subprocess.CompletedProcess[str]:
    """Runs `command` in `project` in its own process group, killed whole when it outlives JOB_TIMEOUT."""
    dead = _dead_tracking()
    env = {**os.environ, "MLFLOW_TRACKING_URI": dead, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "examples")}
    proc = subprocess.Popen(
        command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the DDP cycle did not end within {JOB_TIMEOUT} s (a rank waits forever?)\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def test_a_module_logging_torchmetrics_metrics_trains_on_both_srun_tasks_without_a_solo_collective(
    tmp_path: Path, launcher: subprocess.Popen[bytes]
) -> None:
    """The two ranks are the tasks `srun` starts in an `sbatch --ntasks=2` job (no MASTER_ADDR/PORT, no
    --ntasks-per-node: Lightning's SLURM environment finds rank 0 from the node list and the job id), on gloo.
    Rank 0 bootstraps alone while rank 1 waits for the plan: its metrics must not wait for rank 1 in a
    collective; the DDP fit that follows syncs them on both ranks."""
    project = _metrics_project(tmp_path)
    done, outputs = _cycle_ranks(launcher, project, _dead_tracking(), "--json", started_by="srun")  # JSON outcomes
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    leader, follower = (json.loads(outputs[rank]) for rank in (0, 1))
    assert (leader["cycle"], leader["status"]) == (1, "accepted") and leader["model_dir"]
    assert (follower["cycle"], follower["status"]) == (1, "follower")
    assert {"train/acc_metric", "val/acc_metric"} <= leader["metrics"].keys()
    assert leader["metrics"] == follower["metrics"], "the DDP fit synced every metric across the ranks"
    report = json.loads((project / "demo-work" / "cycle" / "reports" / "cycle-0001.json").read_text())
    assert report["status"] == "accepted" and report["gate"]["accepted"]
    reads = (project / "demo-work" / "cycle" / "reads" / "cycle-0001.jsonl").read_text().splitlines()
    assert len(reads) == report["data"]["allow_list"]["rows"], "each allowed shard read once across both ranks"


def test_a_rank_that_never_arrives_ends_the_cycle_with_one_line_naming_it(tmp_path: Path) -> None:
    """Rank 1 never gets past building its model: rank 0 waits the configured rank_timeout (6 s), not the
    default half hour, then stops the cycle saying which rank did not arrive; the launcher stops rank 1. Started
    plainly: the cycle relaunches itself as two ranks."""
    project = _metrics_project(tmp_path, rank_timeout=6, stall_rank=1)
    done = _job(project, [str(Path(sys.executable).parent / "trainguard"), "cycle", "--config", "cycle.yaml", "--json"])
    assert done.returncode == 1, done.stderr[-3000:]
    reason = "at the start of training, rank 1 did not arrive within 0:00:06"
    assert json.loads(done.stdout) == {"status": "failed", "check": "rank-wait", "reason": reason}
    assert [line for line in done.stderr.splitlines() if "did not arrive" in line] == [f"trainguard: error: {reason}"]
    assert "trainguard: rank 0 stopped (exit code 1); the other ranks with it" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    report = json.loads((project / "demo-work" / "cycle" / "reports" / "cycle-0001.json").read_text())
    assert (report["status"], report["reason"]) == ("failed", reason)
