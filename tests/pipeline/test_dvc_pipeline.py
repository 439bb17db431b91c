"""The DVC pipeline parses in a real DVC repository, tracks the config's params, and works the way DVC users work:
the data owner publishes signed batches outside it, `dvc repro` / `dvc exp run -S` run the cycle, what a run
produces is committed (dvc.lock with its metrics) and pushed to a DVC remote, and a fresh `git clone` + `dvc pull`
continues the pipeline where it stood (`dvc exp show`, `dvc metrics diff`, `dvc plots show` compare the cycles).

Each trainguard command a stage runs is its own process (a cycle imports torch, Lightning and MLflow: most of its
cost), so the repository is prepared once for the module (`prepared`): the pipeline installed with the operator's
and the data owner's keys, batch 0 published, everything committed; each test works in its own copy."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from digits_demo.owner import OWNER_KEYS, publish

from tests.pipeline.conftest import smallest_cycle
from trainguard.pipeline.config import load_config
from trainguard.provenance.keys import generate_signing_key, write_keypair

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _dvc(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run([str(BIN / "dvc"), *args], cwd=repo, capture_output=True, text=True, env=environ, timeout=600)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def _install(repo: Path, with_code: bool = False) -> None:
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "configs", repo / "configs")
    shutil.copytree(ROOT / "examples", repo / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    if with_code:  # the cycle stage depends on the code, so a code change reruns it
        for package in ("trainguard", "pipeline", "defenses", "provenance"):
            shutil.copytree(ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))


def _shorten(config: Path, experiment: str) -> None:
    """A quick cycle whose gate accepts any model, so each `dvc repro` here exits 0, logging to the session's MLflow
    server as `experiment`. Every stage runs at its smallest cost: what these tests check is DVC's view of the cycle
    (which stages run, the params, metrics and plots it leaves), not what the cycle decides."""
    data = yaml.safe_load(config.read_text())
    data = smallest_cycle(data)
    data["tracking"] = {"experiment_name": experiment, "registered_model_name": experiment}
    config.write_text(yaml.safe_dump(data))


def _make_keys(keys: Path, *names: str) -> None:
    """What `trainguard keygen` makes, once per role: Ed25519 for the curator and the data owner, ECDSA P-256 for
    the operator's model key."""
    for name in names:
        write_keypair(generate_signing_key("ecdsa-p256" if name == "model" else "ed25519"), keys / name)


@dataclass(frozen=True)
class Prepared:
    """`bare`: a fresh git + DVC repository; `repo`: one with the pipeline installed (the code included, the cycle
    shortened), the operator's and the data owner's keys made, batch 0 published, and everything committed."""

    bare: Path
    repo: Path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    root = tmp_path_factory.mktemp("dvc-pipeline")
    bare, repo = root / "bare", root / "repo"
    bare.mkdir()
    with pytest.MonkeyPatch.context() as env:  # as tests/conftest.py's per-test environment, which is not set up yet
        env.setenv("DVC_NO_ANALYTICS", "1")
        env.setenv("TRAINGUARD_HOME", str(root / "trainguard-home"))
        _git(bare, "init", "-q", "-b", "main")
        _git(bare, "config", "user.email", "ci@trainguard.invalid")
        _git(bare, "config", "user.name", "trainguard tests")
        for args in (("init", "-q"), ("config", "core.analytics", "false")):
            done = _dvc(bare, *args)
            assert done.returncode == 0, done.stderr
        _git(bare, "add", "-A")
        _git(bare, "commit", "-q", "-m", "init")
        shutil.copytree(bare, repo, symlinks=True)
        _install(repo, with_code=True)
        _shorten(repo / "configs" / "digits.yaml", "dvc-pipeline")
        _make_keys(repo / "demo-work" / "keys", "model", *OWNER_KEYS)
        publish(repo / "demo-work", batch=0)
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", "pipeline, keys (public halves), batch 0")
    return Prepared(bare, repo)


def _copy(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "repo", symlinks=True))


def test_the_pipeline_only_verifies_it_neither_signs_data_nor_makes_keys(prepared: Prepared) -> None:
    """One stage, the cycle: signing is the data owner's, outside the pipeline, and keys are never made by it. Git
    tracks the public keys and the data's DVC file, never a private key."""
    done = _dvc(prepared.repo, "stage", "list", "--name-only")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["cycle"]
    (stage,) = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()
    assert "keygen" not in stage["cmd"] and " sign " not in f" {stage['cmd']} "
    tracked = _git(prepared.repo, "ls-files", "demo-work").split()
    assert sorted(tracked) == [
        "demo-work/data.dvc",
        *(f"demo-work/keys/{name}.pub" for name in ("curator", "model", "owner")),
    ]
    assert not [name for name in _git(prepared.repo, "ls-files").split() if name.endswith(".key")]


def test_the_cycle_stage_tracks_params_that_exist_in_the_config() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (entry,) = stages["cycle"]["params"]
    ((params_file, keys),) = entry.items()
    config = load_config(ROOT / params_file, check_components=False)
    assert set(keys) <= set(config.model_fields_set)
    assert f"--config {params_file}" in stages["cycle"]["cmd"]
    metrics = f"{config.output.work_dir.as_posix()}/metrics.json"
    assert stages["cycle"]["metrics"] == [{metrics: {"cache": False, "persist": True}}]
    state = config.output.state_path.as_posix()
    outs = {next(iter(out)) for out in stages["cycle"]["outs"]}
    assert {state, f"{state.removesuffix('.json')}-log"} <= outs  # the signed state and its log travel


def _manifest_version(path: Path) -> int:
    from trainguard.provenance.dsse import Envelope

    statement = json.loads(Envelope.from_json(path.read_bytes()).payload)
    return int(statement["predicate"]["version"])


def test_a_published_batch_adds_to_the_training_data_and_bumps_only_its_manifest(
    prepared: Prepared, tmp_path: Path
) -> None:
    from trainguard.provenance import KeyFileError, dvc_tracked_md5

    repo = _copy(prepared.repo, tmp_path)
    data = repo / "demo-work" / "data"
    trusted = (data / "trusted.manifest.json").read_bytes()
    owner_key = repo / "demo-work" / "keys" / "owner.key"
    owner_key.rename(tmp_path / "owner.key")
    with pytest.raises(KeyFileError, match=r"owner\.key: make it once with `trainguard keygen"):
        publish(repo / "demo-work", batch=1)  # only who holds the keys publishes; nothing is written first
    assert not (data / "train" / "alice" / "b1-shard-00.parquet").exists()
    (tmp_path / "owner.key").rename(owner_key)
    assert _manifest_version(data / "train.manifest.json") == 1
    publish(repo / "demo-work", batch=1)
    shards = sorted(p.name for p in (data / "train" / "alice").iterdir())
    assert shards == [f"b{batch}-shard-0{i}.parquet" for batch in (0, 1) for i in range(3)]
    assert _manifest_version(data / "train.manifest.json") == 2
    assert (data / "trusted.manifest.json").read_bytes() == trusted  # the curator's base, signed once
    assert len(json.loads((data / "train-sources.json").read_text())) == 24
    assert "alice/b1-shard-00.parquet" in dvc_tracked_md5(data / "train")  # `dvc add`ed, as DVC records it
    assert "demo-work/data.dvc" in _git(repo, "status", "--porcelain")


def test_the_template_for_users_parses_in_a_real_dvc_repository(prepared: Prepared, tmp_path: Path) -> None:
    repo = _copy(prepared.bare, tmp_path)
    shutil.copy(ROOT / "examples" / "dvc" / "dvc.template.yaml", repo / "dvc.yaml")
    done = _dvc(repo, "stage", "list", "--name-only")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["cycle"]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.slow
@pytest.mark.timeout(900)  # two cycles through DVC: a few minutes on a loaded machine
def test_a_committed_pushed_cycle_continues_in_a_fresh_clone_and_experiments_compare_cycles_and_show_plots(
    prepared: Prepared, tmp_path: Path, mlflow_uri: str
) -> None:
    """Cycle 1 runs by `dvc exp run -S` (batch 0 is published), is committed with its dvc.lock (`dvc status` clean,
    nothing to rerun), the data owner publishes batch 1, all is pushed to a DVC remote, and the original checkout
    goes away. A fresh `git clone` + `dvc pull`, on a machine with another trainguard home and only the operator's
    model key added, runs cycle 2 by `dvc exp run -S`: the same data and manifest versions came back, the signed
    state continues (cycle 2, no rollback refusal), no key is made, and the attestation names the committed
    dvc.lock, the remote and the config by absolute URI. Cycle 2's experiment compares against the committed cycle."""
    repo = _copy(prepared.repo, tmp_path)
    knob = "configs/digits.yaml:trainer.init_args.max_epochs={}"
    done = _dvc(repo, "exp", "run", "-S", knob.format(1))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Running stage 'cycle'" in done.stdout
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "cycle 1")
    assert _git(repo, "status", "--porcelain") == ""  # all it made is committed (dvc.lock, metrics, plots) or cached
    status = _dvc(repo, "status")
    assert status.returncode == 0 and "Data and pipelines are up to date" in status.stdout, status.stdout
    again = _dvc(repo, "repro")
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout

    publish(repo / "demo-work", batch=1)
    remote = tmp_path / "remote"
    for args in (("remote", "add", "-d", "store", str(remote)), ("push",)):
        pushed = _dvc(repo, *args)
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "batch 1")
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(repo), str(clone))
    keys = clone / "demo-work" / "keys"
    shutil.copy(repo / "demo-work" / "keys" / "model.key", keys)  # the operator's secret, never in git or DVC
    original = {p.relative_to(repo).as_posix(): p.read_bytes() for p in (repo / "demo-work" / "data").glob("*.json")}
    state = (repo / "demo-work" / "cycle" / "state.json").read_bytes()
    shutil.rmtree(repo)  # the first machine is gone: only git and the DVC remote carry the pipeline

    elsewhere = {"TRAINGUARD_HOME": str(tmp_path / "another-home")}
    pulled = _dvc(clone, "pull", **elsewhere)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert {name: (clone / name).read_bytes() for name in original} == original  # same manifests, same versions
    assert (clone / "demo-work" / "cycle" / "state.json").read_bytes() == state
    key_files = sorted(p.name for p in keys.iterdir())
    done = _dvc(clone, "exp", "run", "-S", knob.format(2), **elsewhere)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Running stage 'cycle'" in done.stdout and "rollback" not in (done.stdout + done.stderr).lower()
    assert sorted(p.name for p in keys.iterdir()) == key_files  # no key made
    assert _git(clone, "status", "--porcelain", "demo-work/keys") == ""  # nor a public key replaced
    metrics = json.loads((clone / "demo-work" / "cycle" / "metrics.json").read_text())
    assert metrics["cycle/number"] == 2
    assert _manifest_version(clone / "demo-work/data/train.manifest.json") == 2
    assert _manifest_version(clone / "demo-work/data/trusted.manifest.json") == 1
    attestation = clone / "demo-work" / "cycle" / "models" / "cycle-0002" / "attestation.intoto.json"
    from trainguard.provenance.dsse import Envelope

    statement = json.loads(Envelope.from_json(attestation.read_bytes()).payload)
    dependencies = {d.get("name"): d for d in statement["predicate"]["buildDefinition"]["resolvedDependencies"]}
    lock = dependencies["dvc.lock"]
    assert lock["digest"] == {"sha256": _sha256(_git(clone, "show", "HEAD:dvc.lock").encode())}  # cycle 1's
    assert lock["annotations"]["remotes"] == {"store": str(remote)}
    (data_uri,) = lock["annotations"]["dataRemoteUris"].items()  # the data owner's out, as pushed
    assert data_uri[0] == "demo-work/data" and Path(data_uri[1]).is_file() and data_uri[1].startswith(str(remote))
    config_uri = statement["predicate"]["buildDefinition"]["externalParameters"]["configUri"]
    assert config_uri == (clone / "configs" / "digits.yaml").resolve().as_uri()

    shown = _dvc(clone, "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)

    def epochs_and_cycle(rev: dict) -> tuple[int, int]:
        data = rev["data"]
        return (
            data["params"]["configs/digits.yaml"]["data"]["trainer"]["init_args"]["max_epochs"],
            data["metrics"]["demo-work/cycle/metrics.json"]["data"]["cycle/number"],
        )

    baselines = [row for row in rows if row.get("experiments")]  # HEAD (cycle 1, committed) and its experiments
    assert len(baselines) == 1 and len(baselines[0]["experiments"]) == 1, shown.stdout
    committed, (experiment,) = baselines[0], baselines[0]["experiments"]
    assert epochs_and_cycle(committed) == (1, 1) and epochs_and_cycle(experiment["revs"][0]) == (2, 2)
    diff = _dvc(clone, "metrics", "diff", "HEAD", experiment["revs"][0]["rev"], "--json")
    assert diff.returncode == 0 and "cycle/number" in json.loads(diff.stdout)["demo-work/cycle/metrics.json"]
    plots = _dvc(clone, "plots", "show", "--json")
    assert plots.returncode == 0, plots.stderr
    shown_plots = json.loads(plots.stdout)
    assert not shown_plots.get("errors"), shown_plots["errors"]
    assert {"robust accuracy vs eps", "accuracy across cycles", "gate per-class accuracy"} <= set(shown_plots["data"])
    assert all(shown_plots["data"].values()), "every plot found its data"
