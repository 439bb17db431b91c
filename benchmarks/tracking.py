"""Benchmark: what MLflow tracking costs a retraining cycle, beside its training, measured in one run.

Goal (issue 23): the MLflow logging a cycle waits for (runs, params, metrics, dataset inputs, the decision tables,
the figures, the MLflow 3 logged model with its metrics, params and datasets, its registration, alias and
description, Lightning's metrics) <= 1% of the cycle's wall time. The tracker queues every MLflow call for its
background thread, so the cycle's share is what queueing costs it; the calls themselves still run, beside it.

One digits cycle (configs/digits.yaml, unchanged) runs against a real `mlflow server` started here, as
`trainguard cycle` runs it (`wait_for_mlflow=False`: the outcome first, the uploads finished before the process
exits). Timed, outermost call per thread only (nested calls count once): every `MlflowClient` call, writing the
pyfunc model and drawing the figures MLflow gets, and every call of trainguard's tracker (`CycleTracker`,
`TrackedRun`, the Lightning `RunLogger`). Printed: the cycle's wall time, its training stage, the time by call on
the cycle's (main) thread and on the tracker's thread, the wait for the uploads left when the cycle returned, and
the fraction of the cycle spent on its own thread logging (the `wait` after it returned is listed, not counted).

Run: `PYTHONPATH=examples .venv/bin/python benchmarks/tracking.py [--epochs N]`. A busy machine slows training and
logging alike.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLIENT_CALLS = (
    "create_experiment",
    "get_experiment_by_name",
    "create_run",
    "set_terminated",
    "update_run",
    "log_batch",
    "log_metric",
    "log_param",
    "set_tag",
    "log_inputs",
    "log_outputs",
    "log_artifact",
    "log_artifacts",
    "log_dict",
    "log_table",
    "log_figure",
    "create_logged_model",
    "log_model_artifacts",
    "finalize_logged_model",
    "get_registered_model",
    "create_registered_model",
    "create_model_version",
    "set_registered_model_alias",
    "update_registered_model",
    "get_run",
)
TRACKER_CALLS = (
    "log_metrics",
    "flush",
    "log_params",
    "set_tags",
    "log_artifact",
    "log_dict",
    "log_datasets",
    "log_table",
    "log_screening",
    "log_figure",
    "finish",
    "lightning_logger",
    "register_model",
)


class Stopwatch:
    """Seconds spent per named call and thread (the cycle's own, or the tracker's), counting only the outermost
    timed call on each thread's stack."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self._stack = threading.local()

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._stack, "depth", 0)
            self._stack.depth = depth + 1
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._stack.depth = depth
                if depth == 0:
                    where = "cycle" if threading.current_thread() is threading.main_thread() else "tracker"
                    self.seconds[where, name] += time.perf_counter() - started
                    self.calls[where, name] += 1

        return timed

    def total(self, where: str) -> float:
        return sum(seconds for (thread, _), seconds in self.seconds.items() if thread == where)


@contextmanager
def timed_tracking(watch: Stopwatch) -> Iterator[None]:
    """Times every MlflowClient call, the pyfunc model's writing, the figures drawn for MLflow and every call of
    the tracker, its runs and its Lightning logger."""
    from mlflow.tracking import MlflowClient

    import trainguard.pipeline.mlflow_model as mlflow_model
    import trainguard.pipeline.plots as plots
    from trainguard.pipeline.run_logger import RunLogger
    from trainguard.pipeline.tracking import CycleTracker, TrackedRun

    targets = [(MlflowClient, name) for name in CLIENT_CALLS]
    targets += [(mlflow_model, "save_pyfunc")]
    targets += [(plots, name) for name in ("robust_figure", "gate_figure", "cycles_figure")]
    targets += [(TrackedRun, name) for name in TRACKER_CALLS]
    targets += [(CycleTracker, name) for name in ("connect", "wait", "_submit")]
    targets += [(RunLogger, name) for name in ("log_metrics", "log_hyperparams")]
    patched: list[tuple[Any, str, Any]] = []
    for owner, name in targets:
        raw = vars(owner)[name] if isinstance(owner, type) else getattr(owner, name)
        patched.append((owner, name, raw))
        timed = watch.wrap(name, getattr(owner, name))
        setattr(owner, name, staticmethod(timed) if isinstance(raw, classmethod) else timed)
    try:
        yield
    finally:
        for owner, name, raw in patched:
            setattr(owner, name, raw)


@contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    root.mkdir(parents=True, exist_ok=True)
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    command += ["--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    with (root / "server.log").open("wb") as log:
        server = subprocess.Popen([*command, "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2):
                        break
                except OSError:
                    time.sleep(0.5)
            yield url
        finally:
            server.terminate()
            server.wait(timeout=30)


def prepare(work: Path, epochs: int | None) -> Path:
    """The digits demo's signed data and config in `work` (the config only points at this experiment)."""
    from digits_demo.demo import create_keys, sign_contributions, sign_trusted
    from digits_demo.prepare import prepare_digits

    (work / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "digits-trust.yaml", work / "configs")
    keys, data = work / "demo-work" / "keys", work / "demo-work" / "data"
    create_keys(keys)
    contributed = prepare_digits(data).contributed()
    sign_trusted(data, keys)
    sign_contributions(data, keys, contributed)
    config = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    config["project"] = str(ROOT / "examples")
    if epochs is not None:
        config["trainer"]["init_args"]["max_epochs"] = epochs
    config["tracking"] = {"experiment_name": "bench-tracking", "registered_model_name": "bench-tracking"}
    path = work / "cycle.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="trainer.init_args.max_epochs (default: the config's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        os.chdir(work)
        os.environ["TRAINGUARD_HOME"] = str(work / "home")
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        config = prepare(work, args.epochs)
        with mlflow_server(work / "mlflow") as url:
            os.environ["MLFLOW_TRACKING_URI"] = url
            from trainguard.pipeline.cycle import run_cycle
            from trainguard.pipeline.tracking import wait_for_uploads

            watch = Stopwatch()
            training = Stopwatch()
            import trainguard.pipeline.cycle.orchestration as cycle_module

            with timed_tracking(watch):
                original_train = cycle_module.train
                cycle_module.train = training.wrap("train", original_train)
                started = time.perf_counter()
                try:
                    outcome = run_cycle(config, wait_for_mlflow=False)
                    wall = time.perf_counter() - started
                    on_path = watch.total("cycle")  # before the wait below, which the cycle has returned from
                    offline = wait_for_uploads()
                    drained = time.perf_counter() - started - wall
                finally:
                    cycle_module.train = original_train
    print(f"cycle {outcome.cycle} {outcome.status}: {outcome.tracking}")
    print(f"MLflow after the uploads: {'; '.join(offline) or 'has everything'}")
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'thread':<9}{'call':<28}{'calls':>6}{'seconds':>10}")
    for (where, name), seconds in sorted(watch.seconds.items(), key=lambda item: (item[0][0], -item[1])):
        print(f"{where:<9}{name:<28}{watch.calls[where, name]:>6}{seconds:>10.3f}")
    beside = watch.total("tracker")
    print(f"cycle wall time                          {wall:8.2f} s")
    print(f"  training stage (fit)                   {training.total('cycle'):8.2f} s")
    print(f"  MLflow logging on the cycle's thread   {on_path:8.3f} s")
    print(f"MLflow calls on the tracker's thread     {beside:8.2f} s  (beside the cycle)")
    print(f"uploads left when the cycle returned     {drained:8.2f} s  (waited for before the process exits)")
    fraction = on_path / wall
    print(f"MLflow logging / cycle time    {fraction:8.2%}  (goal <= 1%: {'met' if fraction <= 0.01 else 'NOT met'})")


if __name__ == "__main__":
    main()
