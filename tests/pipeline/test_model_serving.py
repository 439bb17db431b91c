"""Serving the champion where the project never was: `mlflow models serve --env-manager virtualenv` builds an
environment from the model's own requirements (pip, from the package index) and answers POST /invocations with the
predictions trainguard's verified loader gives here. Opt-in (`make check-serve`, marker `serve`): the environment
takes minutes to install and needs the package index, so `make test` leaves it out.

`serve`, not `predict`: `mlflow models predict --env-manager virtualenv` builds every environment under a fresh
root, so pyenv must download and compile Python itself (from python.org); `serve` uses pyenv's own Pythons."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

import trainguard
from tests.pipeline.conftest import quick_cycle, smallest_cycle
from trainguard.pipeline.cycle import run_cycle

pytestmark = [pytest.mark.serve, pytest.mark.timeout(2400)]
MLFLOW = str(Path(sys.executable).parent / "mlflow")
INSTALL_SECONDS = 1800


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answer(url: str, body: bytes | None = None) -> bytes | None:
    """The server's answer to a GET (or a JSON POST of `body`), None while it does not answer yet."""
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return bytes(response.read())
    except (urllib.error.URLError, ConnectionError):
        return None


def test_the_champion_serves_its_own_predictions_from_a_fresh_virtualenv(
    workdir: Path, mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = workdir / "cycle.yaml"
    config.write_text(yaml.safe_dump(smallest_cycle(quick_cycle("serve-e2e"))))
    outcome = run_cycle(config)
    assert outcome.status == "accepted", outcome.reason
    rows = np.random.default_rng(0).random((6, 64), dtype=np.float32)
    expected = trainguard.load_model("serve-e2e", key=workdir / "demo-work" / "keys" / "model.pub").predict(rows)

    elsewhere = tmp_path_factory.mktemp("elsewhere")  # no project file, no PYTHONPATH
    # The environment (~/.mlflow/envs, named by the model's requirements and Python) holds only what the model's
    # requirements.txt names, never trainguard: the bundled copy and the signed code/ serve.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"MLFLOW_TRACKING_URI": mlflow_uri}
    port = _free_port()
    command = [MLFLOW, "models", "serve", "-m", "models:/serve-e2e@champion", "-p", str(port), "-h", "127.0.0.1"]
    log = elsewhere / "serve.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [*command, "--env-manager", "virtualenv"],
            cwd=elsewhere,
            env=env,
            stdout=output,
            stderr=output,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + INSTALL_SECONDS
        while _answer(f"http://127.0.0.1:{port}/ping") is None:
            assert server.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(5)
        answer = _answer(f"http://127.0.0.1:{port}/invocations", json.dumps({"inputs": rows.tolist()}).encode())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    print(log.read_text()[-3000:])
    assert answer is not None, log.read_text()[-4000:]
    served = json.loads(answer)["predictions"]
    print("served:", served, "\nexpected:", expected.to_dict("records"))
    assert [row["label"] for row in served] == expected["label"].tolist()
    assert np.allclose([row["probability"] for row in served], expected["probability"], atol=1e-6)
