"""Benchmark: what MLflow tracking costs a retraining cycle, beside its training, measured in one run.

Goal (issue 14): all MLflow logging of a cycle (runs, params, metrics, dataset inputs, the decision tables, the
figures, the MLflow 3 logged model, its registration and alias, Lightning's logger) <= 2% of the cycle's wall time.

One digits cycle (configs/digits.yaml, unchanged) runs against a real `mlflow server` started here. Every call of
every `MlflowClient` (trainguard's tracker's and Lightning's MLFlowLogger's) is timed where it is made
(outermost call only, so nested calls count once), as are writing the pyfunc model and drawing the figures MLflow
gets. Printed: the cycle's wall time, its training stage, the logging time by call, and the logging fraction.

Run: `.venv/bin/python benchmarks/tracking.py [--epochs N]`. A busy machine slows training and logging alike.
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
    "get_run",
)


class Stopwatch:
    """Seconds spent per named call, counting only the outermost timed call on the stack."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._depth = 0

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds[name] += time.perf_counter() - started
                    self.calls[name] += 1

        return timed

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


@contextmanager
def timed_tracking(watch: Stopwatch) -> Iterator[None]:
    """Times every MlflowClient call, the pyfunc model's writing and the figures drawn for MLflow."""
    from mlflow.tracking import MlflowClient

    import trainguard.pipeline.mlflow_model as mlflow_model
    import trainguard.pipeline.plots as plots

    patched: list[tuple[Any, str, Any]] = []
    targets = [(MlflowClient, name) for name in CLIENT_CALLS]
    targets += [(mlflow_model, "save_pyfunc")]
    targets += [(plots, name) for name in ("robust_figure", "gate_figure", "cycles_figure")]
    for owner, name in targets:
        original = getattr(owner, name)
        patched.append((owner, name, original))
        setattr(owner, name, watch.wrap(name, original))
    try:
        yield
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)


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

            watch = Stopwatch()
            training = Stopwatch()
            import trainguard.pipeline.cycle.orchestration as cycle_module

            with timed_tracking(watch):
                original_train = cycle_module.train
                cycle_module.train = training.wrap("train", original_train)
                started = time.perf_counter()
                try:
                    outcome = run_cycle(config)
                finally:
                    cycle_module.train = original_train
                wall = time.perf_counter() - started
    print(f"cycle {outcome.cycle} {outcome.status}: {outcome.tracking}")
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'call':<28}{'calls':>6}{'seconds':>10}")
    for name, seconds in sorted(watch.seconds.items(), key=lambda item: -item[1]):
        print(f"{name:<28}{watch.calls[name]:>6}{seconds:>10.3f}")
    print(f"cycle wall time                {wall:8.2f} s")
    print(f"  training stage (fit)         {training.total:8.2f} s  (MLflow calls inside it included)")
    print(f"  MLflow logging, all calls    {watch.total:8.2f} s")
    fraction = watch.total / wall
    print(f"MLflow logging / cycle time    {fraction:8.2%}  (goal <= 2%: {'met' if fraction <= 0.02 else 'NOT met'})")
    print(f"MLflow logging / training time {watch.total / training.total:8.2%}")


if __name__ == "__main__":
    main()
