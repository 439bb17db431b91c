"""The cycle's detection stage: a contributor who flipped labels before signing is flagged as a source, its flagged
rows are quarantined (never served to training, listed in the report, the attestation and MLflow) or all its shards
rejected, depending on the configured action."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from digits_demo.threats import poison_shards

from trainguard.pipeline.attestation import cycle_record
from trainguard.pipeline.config import load_config
from trainguard.pipeline.cycle import run_cycle
from trainguard.pipeline.errors import ConfigError
from trainguard.provenance.allowlist import AllowedShard, AllowList
from trainguard.provenance.dataset import VerifiedDataModule
from trainguard.provenance.verify import open_manifest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def poisoned_workdir(digits_project: Any) -> tuple[Path, dict[str, set[int]]]:
    """Signed digits where `dave` flipped 30% of the labels in each shard; returns the directory and, per shard key,
    the rows he flipped."""
    data = digits_project.data
    poisoned = sorted((data / "train" / "dave").glob("*.parquet"))
    before = {p: pd.read_parquet(p)["label"].to_numpy() for p in poisoned}
    poison_shards(poisoned, 0.3, seed=3)
    flipped = {
        f"data-owner/digits-contributed:{p.relative_to(data / 'train').as_posix()}": set(
            np.flatnonzero(pd.read_parquet(p)["label"].to_numpy() != before[p]).tolist()
        )
        for p in poisoned
    }
    digits_project.sign()
    return digits_project.root, flipped


def _config(workdir: Path, cycle_config: Callable[..., dict[str, Any]], experiment: str, action: str) -> Path:
    """A test cycle's digits config, RONI off (detection alone decides), detectors on with `action`; the detectors
    read the bootstrapped model's probabilities, so it trains 25 epochs."""
    config = cycle_config(
        experiment,
        {
            "training": {"bootstrap_epochs": 25},
            "adversarial": {"enabled": False},
            "robust_eval": {"steps": 1},
            "roni": {"enabled": False},
            "detectors": {"enabled": True, "action": action},
        },
    )
    path = workdir / "cycle.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_flagged_rows_are_quarantined_reported_attested_and_logged(
    poisoned_workdir: tuple[Path, dict[str, set[int]]], mlflow_uri: str, cycle_config: Callable[..., dict[str, Any]]
) -> None:
    workdir, flipped = poisoned_workdir
    outcome = run_cycle(_config(workdir, cycle_config, "detect-rows", "quarantine-rows"))
    assert outcome.status == "accepted", outcome.reason
    report = json.loads(outcome.report.read_text())
    detection = report["detection"]
    assert detection["flagged_sources"] == ["dave"]
    quarantined = detection["quarantined_rows"]
    caught = sum(len(set(rows) & flipped.get(shard, set())) for shard, rows in quarantined.items())
    clean_rows = detection["rows"] - sum(map(len, flipped.values()))
    wrongly = sum(len(set(rows) - flipped.get(shard, set())) for shard, rows in quarantined.items())
    assert caught >= 0.7 * sum(map(len, flipped.values()))
    assert wrongly <= 0.05 * clean_rows
    assert report["training"]["excluded_rows"] == quarantined
    statement = json.loads(
        base64.b64decode(json.loads((outcome.model_dir / "attestation.intoto.json").read_text())["payload"])
    )
    assert cycle_record(statement)["excludedRows"] == quarantined

    client = mlflow.MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("detect-rows")
    screening = next(r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "screening")
    assert screening.data.metrics["detection/quarantined_rows"] == sum(map(len, quarantined.values()))
    assert not any(k.startswith("detection/row") for k in screening.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(screening.info.run_id, "detection")}
    assert artifacts == {f"detection/{name}.json" for name in ("spectral", "clustering", "label-issues")}


def test_a_flagged_source_is_rejected_shard_by_shard(
    poisoned_workdir: tuple[Path, dict[str, set[int]]], cycle_config: Callable[..., dict[str, Any]], mlflow_uri: str
) -> None:
    workdir, flipped = poisoned_workdir
    outcome = run_cycle(_config(workdir, cycle_config, "detect-source", "reject-source"))
    rejected = {d.shard for d in outcome.shards if not d.accepted}
    assert rejected == set(flipped)
    assert all(d.check == "detection" and "dave" in d.reason for d in outcome.shards if d.shard in rejected)
    report = json.loads(outcome.report.read_text())
    assert report["training"]["excluded_rows"] == {}
    allowed = pq.read_table(outcome.report.parent.parent / report["data"]["allow_list"]["path"]).to_pylist()
    assert allowed and not any("dave" in entry["name"] for entry in allowed)


def test_each_sources_label_issue_p_value_joins_ronis_source_test(
    poisoned_workdir: tuple[Path, dict[str, set[int]]], mlflow_uri: str, cycle_config: Callable[..., dict[str, Any]]
) -> None:
    workdir, _ = poisoned_workdir
    path = _config(workdir, cycle_config, "detect-evidence", "report")
    config = yaml.safe_load(path.read_text())
    config["roni"]["enabled"] = True
    path.write_text(yaml.safe_dump(config))
    report = json.loads(run_cycle(path).report.read_text())
    label_issues = {s["source"]: s["p_value"] for s in report["detection"]["detectors"]["label-issues"]["sources"]}
    judged = {s["source"]: s for s in report["roni"]["sources"]}
    assert set(judged) == set(label_issues)
    for name, source in judged.items():
        assert source["evidence"] == [label_issues[name]] and "detector p-value" in source["reason"], name
    assert "dave" in report["roni"]["flagged_sources"]


def test_the_data_module_never_serves_quarantined_rows_yet_reads_the_shard_whole(
    poisoned_workdir: tuple[Path, dict[str, set[int]]],
) -> None:
    workdir, flipped = poisoned_workdir
    data = workdir / "demo-work" / "data"
    verified = open_manifest(
        data / "train.manifest.json", workdir / "configs" / "digits-trust.yaml", data_dir=data / "train"
    )
    key, rows = next(iter(sorted(flipped.items())))
    shard = next(s for s in verified.manifest.shards if f"data-owner/digits-contributed:{s.name}" == key)
    allow = AllowList.of([AllowedShard(verified.manifest_sha256, "digits-contributed", shard.name, shard.sha256)])
    module = VerifiedDataModule.from_verified(
        [verified], allow, exclude_rows={key: rows}, val_roles=None, feature_columns=None
    )
    module.setup()
    frame = pd.read_parquet(data / "train" / shard.name)
    kept = np.setdiff1d(np.arange(len(frame)), sorted(rows))
    assert len(module.train_set) == len(kept)
    assert np.array_equal(module.train_set.labels.numpy(), frame["label"].to_numpy()[kept])
    allow.check_reads(module.read_log)


@pytest.fixture
def decoy_workdir(digits_project: Any) -> tuple[Path, dict[str, list[int]]]:
    """Signed digits where `dave`'s shard starts with one copied row of each of alice's, bob's and carol's shards;
    returns the directory and, per shard key, the rows the copies share."""
    data = digits_project.data
    victims = ("alice", "bob", "carol")
    decoy = data / "train" / "dave" / "b0-shard-00.parquet"
    copies = [pd.read_parquet(data / "train" / v / "b0-shard-00.parquet").iloc[[5]] for v in victims]
    pd.concat([*copies, pd.read_parquet(decoy).iloc[3:]], ignore_index=True).to_parquet(decoy, index=False)
    digits_project.sign()
    shared = {f"data-owner/digits-contributed:{v}/b0-shard-00.parquet": [5] for v in victims}
    return digits_project.root, shared | {"data-owner/digits-contributed:dave/b0-shard-00.parquet": [0, 1, 2]}


def test_a_decoy_copying_a_row_of_each_honest_source_costs_them_only_the_copied_rows(
    decoy_workdir: tuple[Path, dict[str, list[int]]], cycle_config: Callable[..., dict[str, Any]], mlflow_uri: str
) -> None:
    """One decoy shard must not take three honest sources' shards out of the cycle (as quarantining both sides of a
    cross-source duplicate did): every shard is accepted and only the shared rows are skipped."""
    workdir, shared = decoy_workdir
    path = _config(workdir, cycle_config, "decoy", "report")
    config = yaml.safe_load(path.read_text())
    config["detectors"] = {"enabled": False}
    path.write_text(yaml.safe_dump(config))
    outcome = run_cycle(path)
    assert outcome.status == "accepted", outcome.reason
    assert [d.shard for d in outcome.shards if not d.accepted] == []
    report = json.loads(outcome.report.read_text())
    assert report["copied_rows"] == shared
    assert report["training"]["excluded_rows"] == shared
    statement = json.loads(
        base64.b64decode(json.loads((outcome.model_dir / "attestation.intoto.json").read_text())["payload"])
    )
    assert cycle_record(statement)["excludedRows"] == shared


def test_detector_options_are_checked_when_the_config_loads(tmp_path: Path) -> None:
    document = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())
    document["project"] = str(REPO / "examples")
    for options, key in (
        ({"spectral": {"rule": "top"}}, "detectors.spectral.rule"),
        ({"clustering": {"k": 3}}, "detectors.clustering.k"),
    ):
        document["detectors"] = {"enabled": True, **options}
        path = tmp_path / "cycle.yaml"
        path.write_text(yaml.safe_dump(document))
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert caught.value.key == key
    document["detectors"] = {"enabled": True, "action": "delete"}
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError, match=r"detectors\.action"):
        load_config(path)
    document["detectors"] = {"enabled": True}
    document["task"] = "regression"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError, match="class label"):
        load_config(path)


def test_roni_evidence_is_the_label_issue_p_value_of_each_source_small_for_flips() -> None:
    from trainguard.defenses.detectors import REFERENCE, DetectionConfig, detect
    from trainguard.pipeline.detection import roni_evidence

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 600)
    probs = np.full((600, 5), 0.02)
    probs[np.arange(600), labels] = 0.92  # a confident model that agrees with every true label
    given = labels.copy()
    flipped = np.arange(500, 530)  # 30 of source "bad"'s 100 rows relabelled
    given[flipped] = (given[flipped] + 1) % 5
    sources = [REFERENCE] * 400 + ["good"] * 100 + ["bad"] * 100
    features = rng.normal(size=(600, 8))

    found = detect(features, given, sources, DetectionConfig(detectors=("label-issues",)), pred_probs=probs)
    evidence = roni_evidence(found)
    assert set(evidence) == {"good", "bad"}
    assert evidence["bad"][0] < 1e-6 < 0.5 < evidence["good"][0]
    spectral_only = detect(features, given, sources, DetectionConfig(detectors=("spectral",)))
    assert roni_evidence(spectral_only) == {}  # only the label-issue test speaks to what fine-tuning measures
