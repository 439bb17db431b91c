"""Each actor of SECURITY.md runs the CLI against a project whose first cycle released a model: a contributor with
a valid key, a storage attacker with no key, and a replaying mirror. Nothing any of them does may get a byte into
training or a model signed; each is refused in one line with its reason."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from digits_demo.threats import poison_shards, tamper_file

from trainguard.provenance.dsse import Envelope

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DATA = Path("demo-work/data")
KEYS = Path("demo-work/keys")
CYCLE = Path("demo-work/cycle")
PREPARE = ["--sources", "alice,bob,carol,dave", "--shards-per-source", "2", "--shard-size", "50", "--seed", "0"]


Run = Callable[..., subprocess.CompletedProcess[str]]


def _trainguard(project: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """`trainguard *args` as its own process in `project`: a command's smoke test here, or where the process is the
    subject (a cycle killed mid-way, a status no process holds the lock for)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    command = [str(BIN / "trainguard"), *map(str, args)]
    return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=600)


def _prepare(out: Path, *args: str) -> None:
    """The digits example's `prepare` command (examples/digits_demo, not a trainguard command), in this process."""
    from digits_demo.cli import prepare

    prepare.main([str(out), *args], standalone_mode=False)


def _ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _sign_contributions(run: Run, project: Path, *options: str) -> None:
    """The data owner (or a contributor holding its key) signs train/ with the contributor map, plus `options`, by
    `run` (`cli` or `setup_cli`)."""
    _ok(
        run(
            project,
            "sign",
            DATA / "train",
            "--key",
            KEYS / "owner.key",
            "--dataset",
            "digits-contributed",
            "--sources",
            DATA / "train-sources.json",
            "--out",
            DATA / "train.manifest.json",
            *options,
        )
    )


@pytest.fixture(scope="module", autouse=True)
def tracking(mlflow_server: str) -> Iterator[None]:
    """Every cycle of this module logs to the session's MLflow server."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        yield


@pytest.fixture(scope="module")
def released(
    tmp_path_factory: pytest.TempPathFactory, cycle_config: Callable[..., dict[str, Any]], setup_cli: Run
) -> Path:
    """A project set up with the CLI alone (its commands run in this process), whose first cycle accepted and
    signed a model."""
    project = tmp_path_factory.mktemp("released")
    shutil.copytree(REPO / "configs", project / "configs")
    (project / "cycle.yaml").write_text(yaml.safe_dump(cycle_config("scenarios")))
    _prepare(project / DATA, "--batch", "0", *PREPARE)
    for name in ("curator", "owner", "model"):
        _ok(setup_cli(project, "keygen", "--type", "ecdsa-p256", "--out", KEYS / name))
    roles = json.dumps({"holdout.parquet": "holdout"})
    curator = ["--key", KEYS / "curator.key", "--dataset", "digits-trusted", "--source", "curator"]
    trusted = [DATA / "trusted", *curator, "--role", "trusted", "--roles", roles]
    _ok(setup_cli(project, "sign", *trusted, "--out", DATA / "trusted.manifest.json"))
    _sign_contributions(setup_cli, project)
    _ok(setup_cli(project, "cycle", "--config", "cycle.yaml"))
    assert (project / CYCLE / "models" / "cycle-0001").is_dir()
    return project


@pytest.fixture
def project(released: Path, tmp_path: Path, mlflow_uri: str) -> Path:
    """A copy of the released project for one actor to attack (its cycles log to the session's MLflow server)."""
    copy = tmp_path / "project"
    shutil.copytree(released, copy, symlinks=True)
    return copy


@dataclass(frozen=True)
class Advanced:
    """The released project after a second cycle on the contributors' next batch (signed as version 2): the
    project, that cycle's run, and the manifest and state as they stood before it (what a mirror replays)."""

    project: Path
    second: subprocess.CompletedProcess[str]
    old_manifest: bytes
    old_state: bytes


@pytest.fixture(scope="module")
def advanced(released: Path, tmp_path_factory: pytest.TempPathFactory, setup_cli: Run) -> Advanced:
    """Shared by the scenarios that begin after a second cycle on new, clean data: one cycle for all of them (each
    judges the run itself, as it did its own)."""
    project = tmp_path_factory.mktemp("advanced") / "project"
    shutil.copytree(released, project, symlinks=True)
    old_manifest = (project / DATA / "train.manifest.json").read_bytes()
    old_state = (project / CYCLE / "state.json").read_bytes()
    _next_batch(project)
    _sign_contributions(setup_cli, project, "--version", "2")
    second = setup_cli(project, "cycle", "--config", "cycle.yaml")
    return Advanced(project, second, old_manifest, old_state)


@pytest.fixture
def advanced_project(advanced: Advanced, tmp_path: Path, mlflow_uri: str) -> Path:
    """A copy of the `advanced` project for one actor to attack (its cycles log to the session's MLflow server)."""
    copy = tmp_path / "project"
    shutil.copytree(advanced.project, copy, symlinks=True)
    return copy


Cycle = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cycle(cli: Callable[..., subprocess.CompletedProcess[str]]) -> Cycle:
    """`cycle(project, *options)`: `trainguard cycle --config cycle.yaml` in `project`, in this process (`cli`)."""
    return lambda project, *options: cli(project, "cycle", "--config", "cycle.yaml", *options)


def _next_batch(project: Path, poisoned: str | None = None) -> list[Path]:
    """Writes the contributors' next batch; `poisoned` flips 30% of that source's labels. Returns its shards."""
    _prepare(project / DATA, "--batch", "1", *PREPARE)
    shards = sorted((project / DATA / "train").glob("*/b1-*.parquet"))
    if poisoned is not None:
        poison_shards([s for s in shards if s.parent.name == poisoned], 0.3, seed=1)
    return shards


def _digests(paths: list[Path]) -> frozenset[str]:
    return frozenset(hashlib.sha256(p.read_bytes()).hexdigest() for p in paths)


def _refused(project: Path, reason: str, attacker_bytes: frozenset[str] = frozenset(), *, cycle: Cycle) -> None:
    """The next cycle, run by `cycle` in this process, exits 1 with one line naming `reason`, signs nothing, and
    trained on none of those bytes."""
    done = cycle(project)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("trainguard: error:")]
    assert len(errors) == 1 and reason in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in (project / CYCLE / "models").iterdir()) == ["cycle-0001"]
    read = set()
    for log in (project / CYCLE / "reads").glob("*.jsonl"):
        read |= {json.loads(line)["sha256"] for line in log.read_text().splitlines()}
    assert not read & attacker_bytes


# A contributor holding the data owner's valid key.


@pytest.mark.parametrize(
    ("claim", "reason"),
    [
        ({"roles": {"dave/b1-*": "trusted"}}, "unauthorized-role"),
        ({"roles": {"dave/b1-*": "holdout"}}, "unauthorized-role"),
        ({"sources": "curator"}, "unauthorized-source"),
    ],
    ids=["trusted-role", "holdout-role", "curator-source"],
)
def test_a_contributor_key_cannot_claim_trust_it_was_not_granted(
    project: Path, claim: dict[str, object], reason: str, cli: Run, cycle: Cycle
) -> None:
    shards = _next_batch(project, poisoned="dave")
    if "sources" in claim:
        sources = json.loads((project / DATA / "train-sources.json").read_text())
        sources |= {s.relative_to(project / DATA / "train").as_posix(): claim["sources"] for s in shards}
        (project / DATA / "train-sources.json").write_text(json.dumps(sources))
        _sign_contributions(cli, project)
    else:
        _sign_contributions(cli, project, "--roles", json.dumps(claim["roles"]))
    _refused(project, reason, _digests(shards), cycle=cycle)


def test_a_contributor_key_cannot_sign_the_curators_dataset(project: Path, cli: Run, cycle: Cycle) -> None:
    shards = _next_batch(project, poisoned="dave")
    trusted = project / DATA / "trusted.manifest.json"
    owner = ["--key", KEYS / "owner.key", "--dataset", "digits-trusted", "--source", "curator"]
    _ok(cli(project, "sign", DATA / "trusted", *owner, "--role", "trusted", "--out", DATA / "forged.json"))
    shutil.move(project / DATA / "forged.json", trusted)
    _refused(project, "unauthorized-dataset", _digests(shards), cycle=cycle)


# A storage attacker: write access to the files, no key.


def test_another_signed_dataset_copied_over_a_manifest_path_is_refused(project: Path, cycle: Cycle) -> None:
    shutil.copy(project / DATA / "train.manifest.json", project / DATA / "trusted.manifest.json")
    _refused(project, "wrong-dataset", cycle=cycle)


def test_a_tampered_trusted_shard_stops_the_cycle(project: Path, cycle: Cycle) -> None:
    base = project / DATA / "trusted" / "base.parquet"
    tamper_file(base)
    # In this process: `trainguard cycle` starts as its own process in the mid-cycle scenario below.
    _refused(project, "digest-mismatch", _digests([base]), cycle=cycle)


def test_an_edited_verdict_in_the_cycle_state_is_refused(project: Path, cycle: Cycle) -> None:
    segment = project / CYCLE / "state-log" / "cycle-0001.jsonl"
    lines = segment.read_bytes().splitlines()
    edited_any = False
    for index, line in enumerate(lines):
        envelope = Envelope.from_json(line)
        edited = envelope.payload.replace(b'"accepted":true', b'"accepted":false', 1)
        if edited != envelope.payload:
            lines[index] = Envelope(envelope.payload_type, edited, envelope.signatures).to_json(indent=None)
            edited_any = True
            break
    assert edited_any
    segment.write_bytes(b"\n".join(lines) + b"\n")
    _refused(project, "edited outside trainguard", cycle=cycle)


def test_a_deleted_cycle_state_is_refused_until_reinitialised_and_no_model_is_overwritten(
    project: Path, cycle: Cycle
) -> None:
    (project / CYCLE / "state.json").unlink()
    _refused(project, "--reinit", cycle=cycle)
    released = (project / CYCLE / "models" / "cycle-0001" / "model.safetensors").read_bytes()
    done = _ok(cycle(project, "--reinit", "--json"))
    assert json.loads(done.stdout)["cycle"] == 2
    assert "anti-rollback record(s) kept" in done.stderr
    assert (project / CYCLE / "models" / "cycle-0001" / "model.safetensors").read_bytes() == released


def test_reinit_after_a_deleted_state_keeps_refusing_an_older_manifest(
    advanced: Advanced, advanced_project: Path, cycle: Cycle
) -> None:
    project = advanced_project  # the next batch signed as version 2 and its cycle run
    _ok(advanced.second)
    shutil.rmtree(project / CYCLE / "state-log")
    (project / CYCLE / "state.json").unlink()
    (project / DATA / "train.manifest.json").write_bytes(advanced.old_manifest)
    models = ["cycle-0001", "cycle-0002"]
    _replayed(cycle, project, "--reinit", models)
    _replayed(cycle, project, "rollback", models, "--reinit")


def test_planted_report_and_model_names_neither_stop_a_cycle_nor_force_a_reset(project: Path, cycle: Cycle) -> None:
    for planted in ("reports/cycle-9999.json", "reports/cycle-1x.json", "reports/cycle-9999.receipt.json"):
        (project / CYCLE / planted).write_text("")
    (project / CYCLE / "models" / "cycle-0abc").mkdir()
    done = _ok(cycle(project, "--force", "--json"))
    assert json.loads(done.stdout)["cycle"] == 2


def test_an_older_release_copied_over_the_newest_is_refused_as_the_starting_model(
    advanced: Advanced, advanced_project: Path, cycle: Cycle
) -> None:
    project = advanced_project  # released, then a second cycle released cycle-0002
    _ok(advanced.second)
    models = project / CYCLE / "models"
    shutil.copytree(models / "cycle-0001", models / "cycle-0002", dirs_exist_ok=True)  # its code/ folder too
    done = cycle(project, "--force")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("trainguard: error:")]
    assert len(errors) == 1 and "not the recorded" in errors[0], done.stderr[-2000:]
    assert sorted(p.name for p in models.iterdir()) == ["cycle-0001", "cycle-0002"]


def test_another_pipelines_state_sharing_the_cycle_key_is_refused(project: Path, cycle: Cycle) -> None:
    from trainguard.pipeline.cycle_state import CycleState, Pipeline
    from trainguard.pipeline.state_log import StateStore
    from trainguard.provenance.keys import load_signing_key

    foreign = StateStore(project / "other" / "state.json", load_signing_key(project / KEYS / "model.key"))
    foreign.update(CycleState.genesis(Pipeline.new("other-pipeline", "other")).begin("c").fail("x"))
    shutil.rmtree(project / CYCLE / "state-log")
    shutil.copy(foreign.path, project / CYCLE / "state.json")
    shutil.copytree(foreign.log_dir, project / CYCLE / "state-log")
    _refused(project, "belongs to pipeline 'other-pipeline'", cycle=cycle)


def test_a_fifo_planted_as_the_trust_policy_fails_without_hanging(project: Path, cycle: Cycle) -> None:
    policy = project / "configs" / "digits-trust.yaml"
    policy.unlink()
    os.mkfifo(policy)
    _refused(project, "not a regular file", cycle=cycle)


# A mirror replaying what it served before.


def test_a_replaying_mirror_can_roll_back_neither_a_manifest_nor_the_state(
    advanced: Advanced, advanced_project: Path, cycle: Cycle
) -> None:
    project, second = advanced_project, advanced.second  # the next batch, signed and cycled
    assert second.returncode in (0, 1) and "Traceback" not in second.stderr
    models = sorted(p.name for p in (project / CYCLE / "models").iterdir())

    (project / DATA / "train.manifest.json").write_bytes(advanced.old_manifest)
    _replayed(cycle, project, "rollback", models)
    (project / CYCLE / "state.json").write_bytes(advanced.old_state)
    _replayed(cycle, project, "mid-cycle state was put back", models)


def test_a_mid_cycle_state_put_back_after_the_cycle_finished_is_refused(project: Path, cli: Run, cycle: Cycle) -> None:
    old_manifest = (project / DATA / "train.manifest.json").read_bytes()
    _next_batch(project)
    _sign_contributions(cli, project, "--version", "2")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    running = subprocess.Popen(
        [str(BIN / "trainguard"), "cycle", "--config", "cycle.yaml"], cwd=project, env=env, stderr=subprocess.PIPE
    )
    segment, head = project / CYCLE / "state-log" / "cycle-0002.jsonl", project / CYCLE / "state.json"
    mid_cycle = (b"", b"")
    while running.poll() is None and not mid_cycle[0]:
        if segment.is_file() and segment.read_bytes().count(b"\n") >= 3:  # begun, version 2 and manifests recorded
            mid_cycle = (head.read_bytes(), segment.read_bytes())  # the head first: the log is never behind it
        time.sleep(0.05)
    assert running.wait(timeout=600) == 0 and mid_cycle[0], (
        running.stderr.read().decode()[-2000:] if running.stderr else ""
    )
    models = sorted(p.name for p in (project / CYCLE / "models").iterdir())

    head.write_bytes(mid_cycle[0])
    _replayed(cycle, project, "mid-cycle state was put back", models)
    segment.write_bytes(mid_cycle[1])  # the whole state as it stood mid-cycle, head and log
    (project / DATA / "train.manifest.json").write_bytes(old_manifest)
    _replayed(cycle, project, "mid-cycle state was put back", models)


def _replayed(cycle: Cycle, project: Path, reason: str, models: list[str], *options: str) -> None:
    done = cycle(project, *options)
    assert done.returncode == 1 and reason in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert sorted(p.name for p in (project / CYCLE / "models").iterdir()) == models


def test_only_the_operators_logged_command_resets_anti_rollback(project: Path, cli: Run) -> None:
    status = _ok(cli(project, "status", "--config", "cycle.yaml")).stdout
    namespace = next(line.split()[1] for line in status.splitlines() if "/digits-contributed at version 1" in line)
    # As its own process: reset-rollback's smoke test.
    unknown = _trainguard(project, "reset-rollback", "--config", "cycle.yaml", "--reason", "r", "nobody/nothing")
    assert unknown.returncode == 2 and "no anti-rollback record" in unknown.stderr and "Traceback" not in unknown.stderr
    done = _ok(cli(project, "reset-rollback", "--config", "cycle.yaml", "--reason", "re-signed", namespace))
    assert "was version 1" in done.stdout
    assert namespace not in _ok(cli(project, "status", "--config", "cycle.yaml")).stdout
    history = (project / CYCLE / "state-log" / "cycle-0001.jsonl").read_bytes().splitlines()
    assert json.loads(Envelope.from_json(history[-1]).payload)["event"]["body"]["reason"] == "re-signed"


# A second contributor key set, granted any source name of the same dataset.


@pytest.fixture(scope="module")
def partnered(released: Path, tmp_path_factory: pytest.TempPathFactory, setup_cli: Run) -> tuple[Path, dict[str, Any]]:
    """The released project after a cycle with a second key set `partner`, granted `sources: ["*"]` on
    digits-contributed, that signs 15 fresh shards (450 rows: over the 0.4 cap as one source) under minted sources
    dave-00..dave-14, and a shard named like one of the data owner's with pixels out of range. Returns the project
    and the cycle's report."""
    project = tmp_path_factory.mktemp("partnered") / "project"
    shutil.copytree(released, project, symlinks=True)
    _ok(setup_cli(project, "keygen", "--type", "ecdsa-p256", "--out", KEYS / "partner"))
    policy = yaml.safe_load((project / "configs" / "digits-trust.yaml").read_text())
    policy["signers"].append(
        {
            "name": "partner",
            "keys": ["../demo-work/keys/partner.pub"],
            "datasets": ["digits-contributed"],
            "sources": ["*"],
            "roles": ["train"],
        }
    )
    (project / "configs" / "digits-trust.yaml").write_text(yaml.safe_dump(policy))
    fresh = project / "fresh"
    _prepare(fresh, "--batch", "1", "--sources", "p", "--shards-per-source", "15", "--shard-size", "30")
    partner = project / DATA / "partner"
    sources = {}
    for i, shard in enumerate(sorted((fresh / "train" / "p").glob("*.parquet"))):
        (partner / f"dave-{i:02d}").mkdir(parents=True)
        shutil.copy(shard, partner / f"dave-{i:02d}" / shard.name)
        sources[f"dave-{i:02d}/{shard.name}"] = f"dave-{i:02d}"
    namesake = sorted((project / DATA / "train" / "alice").glob("b0-*.parquet"))[0]
    (partner / "alice").mkdir()
    frame = pd.read_parquet(namesake)
    frame.assign(pixel_0=5.0).to_parquet(partner / "alice" / namesake.name)
    sources[f"alice/{namesake.name}"] = "alice"
    (project / DATA / "partner-sources.json").write_text(json.dumps(sources))
    sign = ["sign", DATA / "partner", "--key", KEYS / "partner.key", "--dataset", "digits-contributed"]
    _ok(setup_cli(project, *sign, "--sources", DATA / "partner-sources.json", "--out", DATA / "partner.manifest.json"))
    config = yaml.safe_load((project / "cycle.yaml").read_text())
    config["dataset"]["training"].append(
        {"manifest": str(DATA / "partner.manifest.json"), "dataset": "digits-contributed", "data_dir": str(partner)}
    )
    (project / "cycle.yaml").write_text(yaml.safe_dump(config))
    done = setup_cli(project, "cycle", "--config", "cycle.yaml", "--json")
    assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stderr[-3000:]
    return project, json.loads((project / CYCLE / "reports" / "cycle-0002.json").read_text())


def test_a_namesake_shard_in_another_key_sets_manifest_gets_its_own_verdict(
    partnered: tuple[Path, dict[str, Any]],
) -> None:
    project, report = partnered
    name = next(p.name for p in (project / DATA / "partner" / "alice").iterdir())
    refused = {d["shard"]: d for d in report["validation"]}
    assert f"partner/digits-contributed:alice/{name}" in refused
    assert f"data-owner/digits-contributed:alice/{name}" not in refused
    allowed = pq.read_table(project / CYCLE / report["data"]["allow_list"]["path"]).to_pylist()
    assert any(e["name"] == f"alice/{name}" and e["dataset"] == "digits-contributed" for e in allowed)


def test_minting_source_names_under_one_key_buys_no_larger_cap(partnered: tuple[Path, dict[str, Any]]) -> None:
    _, report = partnered
    capped = report["limits"]
    assert capped and {d["source"] for d in capped} == {"partner/*"}
    assert all(d["shard"].startswith("partner/digits-contributed:dave-") for d in capped)


def test_a_source_the_operator_cleared_is_screened_afresh_in_the_next_cycle(
    project: Path, cli: Run, cycle: Cycle
) -> None:
    # The detectors only report here: by default they refuse dave's source first, every cycle, and RONI's verdicts,
    # which a clear resets, are never reached.
    config = yaml.safe_load((project / "cycle.yaml").read_text())
    config["detectors"] = {**config.get("detectors", {}), "action": "report"}
    (project / "cycle.yaml").write_text(yaml.safe_dump(config))
    shards = _next_batch(project, poisoned="dave")
    _sign_contributions(cli, project)
    cycle(project)
    dave = {f"data-owner/digits-contributed:{s.relative_to(project / DATA / 'train').as_posix()}" for s in shards}
    dave = {key for key in dave if ":dave/" in key}

    def screened(cycle: int) -> set[str]:
        report = json.loads((project / CYCLE / "reports" / f"cycle-{cycle:04d}.json").read_text())
        return {d["name"] for d in report["roni"].get("decisions", [])} & dave

    assert screened(2) == dave
    # As its own process: the sources command's smoke test.
    done = _ok(_trainguard(project, "sources", "--config", "cycle.yaml", "--reason", "reshuffled", "clear", "dave"))
    assert "clear recorded in the signed state" in done.stdout
    cycle(project, "--force")
    assert screened(3) == dave  # judged afresh, not reused from cycle 2
    cycle(project, "--force")
    assert screened(4) == set()  # without a new clear, cycle 3's verdicts stand
    events = [json.loads(Envelope.from_json(line).payload)["event"] for line in _log_lines(project)]
    assert any(e["kind"] == "source" and e["body"]["action"] == "clear" for e in events)


def _log_lines(project: Path) -> list[bytes]:
    return [
        line
        for path in sorted((project / CYCLE / "state-log").glob("*.jsonl"))
        for line in path.read_bytes().splitlines()
    ]


def test_status_marks_a_cycle_no_process_runs_as_interrupted(project: Path) -> None:
    """`status` as its own process: whether a process holds the cycle's lock is its subject."""
    from trainguard.pipeline.state_log import StateStore
    from trainguard.provenance.keys import load_signing_key

    store = StateStore(project / CYCLE / "state.json", load_signing_key(project / KEYS / "model.key"))
    store.identity = ("digits", CYCLE.as_posix())
    store.update(store.load().begin("a config killed mid-cycle"))
    status = _ok(_trainguard(project, "status", "--config", "cycle.yaml")).stdout
    assert "interrupted" in status and "resumes it" in status
    with store.locked():
        assert "interrupted" not in _ok(_trainguard(project, "status", "--config", "cycle.yaml")).stdout
