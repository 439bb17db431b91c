"""Session fixtures with real parts: an MLflow tracking server and DVC repositories."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server at {url} did not answer within {timeout:.0f} s")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with a sqlite store; yields its tracking URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_until_up(url, proc, timeout=180)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def mlflow_uri(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Points MLflow at the session's server for one test: MLFLOW_TRACKING_URI and MLflow's process-wide URIs
    (which Lightning's logger and `mlflow.set_tracking_uri` set, and which win over the environment), each put back
    exactly as it was afterwards, unset included, so no test reads another's server."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    earlier = tracking._tracking_uri, registry._registry_uri
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(name, mlflow_server)  # monkeypatch restores them, whatever set_*_uri did to them
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    try:
        yield mlflow_server
    finally:
        tracking._tracking_uri, registry._registry_uri = earlier


def _run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    """A fresh git + DVC repository (real `git init` and `dvc init`)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _run(["git", "init", "-q", "-b", "main"], repo)
    _run(["git", "config", "user.email", "ci@trainguard.invalid"], repo)
    _run(["git", "config", "user.name", "trainguard tests"], repo)
    _run([str(BIN / "dvc"), "init", "-q"], repo)
    _run([str(BIN / "dvc"), "config", "core.analytics", "false"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-q", "-m", "init"], repo)
    return repo


@pytest.fixture(autouse=True)
def _quiet_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keeps tests from writing to the user's home: trainguard state, DVC analytics, MLflow defaults."""
    monkeypatch.setenv("TRAINGUARD_HOME", str(tmp_path / "trainguard-home"))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'default-mlruns.db'}")


@pytest.fixture
def read_cycle_state() -> Callable[[Path], dict[str, Any]]:
    """Reads the signed cycle state of a demo layout under `root` (checked with its cycle key) as JSON data."""
    import json

    from trainguard.pipeline.state_log import StateStore
    from trainguard.provenance.dsse import Envelope
    from trainguard.provenance.keys import load_signing_key

    def read(root: Path) -> dict[str, Any]:
        key = load_signing_key(root / "demo-work" / "keys" / "model.key")
        path = root / "demo-work" / "cycle" / "state.json"
        pipeline = json.loads(Envelope.from_json(path.read_bytes()).payload)["state"]["pipeline"]
        return StateStore(path, key, (pipeline["name"], pipeline["work_dir"])).load().model_dump(mode="json")

    return read
