"""trainguard installs as one namespace, `trainguard.*`, and never takes a user's own `pipeline` or `provenance`."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from digits_demo.demo import create_keys, sign_contributions, sign_trusted
from digits_demo.prepare import prepare_digits

from tests.pipeline.conftest import smallest_cycle

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tracked_tree(destination: Path) -> Path:
    """A copy of the files git tracks, so the build sees what a fresh clone would."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    return destination


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `python -m build` makes from the tracked sources."""
    root = tmp_path_factory.mktemp("build")
    source = _tracked_tree(root / "src")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(root / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (built,) = (root / "dist").glob("trainguard-*.whl")
    return built


def test_the_wheel_has_one_top_level_package_trainguard(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"trainguard"}
    modules = (
        "provenance/verify.py",
        "defenses/roni/screening.py",
        "defenses/attacks/pgd.py",
        "pipeline/commands/data.py",
        "pipeline/config/schema.py",
        "pipeline/cycle/orchestration.py",
    )
    for module in modules:
        assert f"trainguard/{module}" in names
    assert "trainguard/py.typed" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "trainguard = trainguard.pipeline.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_a_regular_wheel_install_imports_and_verifies_from_its_own_files(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    installed = subprocess.run(
        [str(BIN / "pip"), "install", "--quiet", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(b"shard")
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        import trainguard.provenance as provenance
        from trainguard.pipeline.cli import main
        assert Path(provenance.__file__).is_relative_to(sys.argv[1]), provenance.__file__
        assert 'torch' not in sys.modules
        data = Path(sys.argv[2])
        codes = [
            main(['keygen', '--out', str(data.parent / 'owner')]),
            main(['sign', str(data), '--key', str(data.parent / 'owner.key'), '--out', str(data.parent / 'm.json'),
                  '--dataset', 'wheel-check', '--source', 'alice']),
            main(['verify', str(data.parent / 'm.json'), '--trust', str(data.parent / 'owner.pub'),
                  '--data-dir', str(data), '--state', str(data.parent / 'rollback.json')]),
        ]
        print(codes)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(site), str(data)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[0, 0, 0]"


_USER_PROVENANCE = '''\
"""The user's own `provenance` package: nothing to do with trainguard's."""

OWNER = "user-project"
'''

_USER_MODELS = '''\
"""The user's own `pipeline.models`: a model that records which modules it was built beside."""

import json
import sys

import provenance
import digits_demo.models
import trainguard.provenance


class UserClassifier(digits_demo.models.DigitsClassifier):
    def __init__(self, report: str, channels: int = 8, lr: float = 0.002) -> None:
        super().__init__(channels=channels, lr=lr)
        modules = {
            name: sys.modules[name].__file__
            for name in ("pipeline", "pipeline.models", "provenance", "trainguard.provenance", "trainguard.pipeline")
        }
        with open(report, "w") as out:
            json.dump({"owner": provenance.OWNER, "modules": modules}, out)
'''


def _user_project(root: Path) -> Path:
    """A throwaway project with its own `pipeline/` and `provenance/` packages, and a cycle config naming its model."""
    (root / "pipeline").mkdir(parents=True)
    (root / "pipeline" / "__init__.py").write_text('"""The user\'s own pipeline package."""\n')
    (root / "pipeline" / "models.py").write_text(_USER_MODELS)
    (root / "provenance").mkdir()
    (root / "provenance" / "__init__.py").write_text(_USER_PROVENANCE)
    config = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())
    config["project"] = str(REPO / "examples")  # the digits example, wherever this copy is written
    config = smallest_cycle(config)  # what this test checks is where the modules come from
    config["trainer"]["init_args"].update(max_epochs=1)
    config["tracking"] = {"experiment_name": "user-project", "registered_model_name": "user-project"}
    config["model"] = {
        "class_path": "pipeline.models.UserClassifier",
        "init_args": {"report": str(root / "modules.json"), "channels": 8},
    }
    (root / "cycle.yaml").write_text(yaml.safe_dump(config))
    (root / "configs").mkdir()
    shutil.copy(REPO / "configs" / "digits-trust.yaml", root / "configs")
    keys = root / "demo-work" / "keys"
    data = root / "demo-work" / "data"
    create_keys(keys)
    contributed = prepare_digits(data).contributed()
    sign_trusted(data, keys)
    sign_contributions(data, keys, contributed)
    return root


def test_a_cycle_runs_a_model_from_a_project_with_its_own_pipeline_and_provenance(
    tmp_path: Path, mlflow_server: str, read_cycle_state: Any
) -> None:
    project = _user_project(tmp_path / "project")
    env = {**os.environ, "PYTHONPATH": str(project), "MLFLOW_TRACKING_URI": mlflow_server}
    done = subprocess.run(
        [str(BIN / "trainguard"), "cycle", "--config", "cycle.yaml"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    report = json.loads((project / "modules.json").read_text())
    assert report["owner"] == "user-project"
    modules = {name: Path(path) for name, path in report["modules"].items()}
    for own in ("pipeline", "pipeline.models", "provenance"):
        assert modules[own].is_relative_to(project), (own, modules[own])
    for ours in ("trainguard.provenance", "trainguard.pipeline"):
        assert not modules[ours].is_relative_to(project), (ours, modules[ours])
        assert modules[ours].parent.name == ours.split(".")[1]
    state = read_cycle_state(project)
    assert state["cycles"][-1]["status"] == "accepted"


def test_importing_trainguard_loads_no_torch_until_a_name_is_used() -> None:
    code = (
        "import sys, trainguard; before = 'torch' in sys.modules; trainguard.VerifiedDataModule;"
        "trainguard.AdversarialTraining; print(before, 'torch' in sys.modules, 'pipeline' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "False"]


def test_a_type_checker_sees_the_lazy_names_of_an_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    """py.typed ships and the TYPE_CHECKING re-exports name what `__getattr__` imports: mypy, reading the wheel
    installed in a bare virtualenv (no torch), resolves `trainguard.AdversarialTraining` to the class, not Any."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    installed = subprocess.run(
        [str(BIN / "pip"), "install", "--quiet", "--no-deps", "--no-index", "--target", purelib, str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    snippet = (
        "import trainguard, trainguard.defenses, trainguard.provenance\n"
        "reveal_type(trainguard.AdversarialTraining)\n"
        "reveal_type(trainguard.defenses.ModelGate)\n"
        "reveal_type(trainguard.provenance.VerifiedDataModule)\n"
        "reveal_type(trainguard.verify_dataset)\n"
    )
    (tmp_path / "empty.ini").write_text("[mypy]\n")
    python = str(venv / "bin" / "python")
    done = subprocess.run(
        [
            str(BIN / "mypy"),
            "--config-file",
            "empty.ini",
            "--no-incremental",
            "--python-executable",
            python,
            "-c",
            snippet,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    revealed = [line for line in done.stdout.splitlines() if "Revealed type" in line]
    assert len(revealed) == 4, done.stdout + done.stderr
    assert "trainguard.defenses.adversarial.AdversarialTraining" in revealed[0]
    assert "trainguard.defenses.gate.ModelGate" in revealed[1]
    assert "trainguard.provenance.dataset.VerifiedDataModule" in revealed[2]
    assert "trainguard.provenance.verify.VerificationReport" in revealed[3]
    assert not any('Revealed type is "Any"' in line for line in revealed), revealed


def _type_checking_names(package: Path) -> set[str]:
    """The names a package's `__init__` imports under `if TYPE_CHECKING:`."""
    tree = ast.parse((package / "__init__.py").read_text())
    blocks = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    return {alias.asname or alias.name for block in blocks for node in block.body for alias in node.names}


@pytest.mark.parametrize("package", ["trainguard", "provenance", "defenses"])
def test_every_lazy_name_has_a_type_checking_import(package: str) -> None:
    """A name added to `_LAZY` without its TYPE_CHECKING import would be Any to type checkers and IDEs."""
    tree = ast.parse((REPO / package / "__init__.py").read_text())
    lazy = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "_LAZY"
    )
    assert _type_checking_names(REPO / package) == set(lazy)
