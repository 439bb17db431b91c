"""Session fixtures with real parts: an MLflow tracking server and DVC repositories; and a trainguard command run in
this process (`cli` in a test, `setup_cli` in a fixture wider than one test)."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent

# One intra-op thread per test process and per process a test starts (CLI cycles, torchrun ranks): the suite runs a
# worker per core, and torch's default of a thread per core makes their threads spin against each other (a digits
# CNN step went from 30 ms to 0.3-0.8 s on two busy cores). Set before torch is imported, so its pools start so.
os.environ.setdefault("OMP_NUM_THREADS", "1")


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


@dataclass(frozen=True)
class _Server:
    """A started `mlflow server`: its tracking URI and process id (the leader of its own process group)."""

    url: str
    pid: int


def _start_server(root: Path) -> _Server:
    """Starts a real `mlflow server` on 127.0.0.1 with a sqlite store under `root`, without the job runners that
    GenAI evaluation uses, and waits until it answers."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with (root / "server.log").open("wb") as log:
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
            # No job runners: eight huey consumers that the tests never use would double the start on two cores.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
    try:
        _wait_until_up(url, proc, timeout=180)
    except BaseException:
        _stop_server(proc.pid)
        raise
    return _Server(url, proc.pid)


def _stop_server(pid: int) -> None:
    """Ends the server's process group (the server and the workers it forked), killing what outlives 20 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not _exited(pid):
            time.sleep(0.2)
        if _exited(pid):
            return


def _exited(pid: int) -> bool:
    """Whether process `pid` has ended: reaped where it is this process's child (the server a fixture started),
    else no longer there or a zombie (a server an xdist worker started, stopped by the controller)."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: whether it can still be signalled
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


SHARED_SERVER = pytest.StashKey[Path]()
SHARED_OPTION = "trainguard_mlflow_dir"


def pytest_configure(config: pytest.Config) -> None:
    """Where a plugin imported torch before this file set OMP_NUM_THREADS, its thread count is set here."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist's controller, for each worker it starts: the folder where the session's one MLflow server is recorded."""
    config = node.config
    if SHARED_SERVER not in config.stash:
        config.stash[SHARED_SERVER] = Path(tempfile.mkdtemp(prefix="trainguard-mlflow-"))
    node.workerinput[SHARED_OPTION] = str(config.stash[SHARED_SERVER])


def pytest_unconfigure(config: pytest.Config) -> None:
    """xdist's controller, once every worker is done: stops the shared server, if a worker started one."""
    shared = config.stash.get(SHARED_SERVER, None)
    if shared is None:
        return
    record = shared / "server.json"
    if record.is_file():
        _stop_server(json.loads(record.read_text())["pid"])
    shutil.rmtree(shared, ignore_errors=True)


ARTIFACTS: dict[str, Path] = {}  # tracking URI -> its server's artifact folder


@pytest.fixture(scope="session")
def mlflow_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with a sqlite store; yields its tracking URI. Under xdist one server
    serves every worker: the first to ask starts it under a file lock and records it, the others reuse it, and the
    controller stops it when the session ends (it takes ~30 s to answer the first time)."""
    shared = getattr(request.config, "workerinput", {}).get(SHARED_OPTION)
    if shared is None:
        root = tmp_path_factory.mktemp("mlflow")
        server = _start_server(root)
        ARTIFACTS[server.url] = root / "artifacts"
        try:
            yield server.url
        finally:
            _stop_server(server.pid)
        return
    root = Path(shared)
    record = root / "server.json"
    with (root / "server.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes; the holder waits at most 180 s for its server
        if not record.is_file():
            server = _start_server(root)
            record.write_text(json.dumps({"url": server.url, "pid": server.pid}))
    url = json.loads(record.read_text())["url"]
    ARTIFACTS[url] = root / "artifacts"
    yield url


@pytest.fixture(scope="session")
def mlflow_artifacts(mlflow_server: str) -> Path:
    """The session server's --artifacts-destination folder: what an attacker with write access to the artifact
    store edits."""
    return ARTIFACTS[mlflow_server]


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


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., subprocess.CompletedProcess]:
    """`cli(project, *args, env=None)`: `trainguard *args` run in `project` by the CLI's own entry point in this
    process, with `env`'s variables set for this one command: the command's exit code, output and one-line errors
    without a process start (a second or more on two busy cores, before the command's own imports). What the CLI
    sets up for its process (logging levels, MLflow's environment, warning filters) is put back afterwards. Each
    command keeps one test that starts it as its own process."""
    from trainguard.pipeline.cli import main

    def run(project: Path, *args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        monkeypatch.chdir(project)
        for name in (
            "MLFLOW_LOGGING_LEVEL",
            "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
        ):
            monkeypatch.delenv(name, raising=False)  # the CLI sets them if unset; monkeypatch puts them back
        root = logging.getLogger()
        levels = (root.level, [(handler, handler.level) for handler in root.handlers])
        capsys.readouterr()
        try:
            with warnings.catch_warnings(), pytest.MonkeyPatch.context() as scoped:
                for name, value in (env or {}).items():
                    scoped.setenv(name, value)
                code = main([str(arg) for arg in args])
        finally:
            root.setLevel(levels[0])
            for handler, level in levels[1]:
                handler.setLevel(level)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["trainguard", *map(str, args)], code, out.out, out.err)

    return run


@pytest.fixture(scope="session")
def setup_cli() -> Callable[..., subprocess.CompletedProcess]:
    """`setup_cli(project, *args, env=None)`: `cli` for a fixture wider than one test (a module's prepared project),
    where `capsys` and `monkeypatch` are not at hand: the command's output is read by redirecting sys.stdout and
    sys.stderr, and what it changes for its process (working directory, environment, logging levels, warning
    filters, MLflow's process-wide URIs) is put back after each command, as if it had run as its own process."""
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    from trainguard.pipeline.cli import main

    def run(project: Path, *args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        cwd, environ = Path.cwd(), dict(os.environ)
        root = logging.getLogger()
        levels = (root.level, [(handler, handler.level) for handler in root.handlers])
        uris = tracking._tracking_uri, registry._registry_uri
        out, err = io.StringIO(), io.StringIO()
        try:
            os.chdir(project)
            for name in (
                "MLFLOW_LOGGING_LEVEL",
                "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
            ):
                os.environ.pop(name, None)  # the CLI sets them if unset
            os.environ.update(env or {})
            with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main([str(arg) for arg in args])
        finally:
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(environ)
            root.setLevel(levels[0])
            for handler, level in levels[1]:
                handler.setLevel(level)
            tracking._tracking_uri, registry._registry_uri = uris
        return subprocess.CompletedProcess(["trainguard", *map(str, args)], code, out.getvalue(), err.getvalue())

    return run


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
