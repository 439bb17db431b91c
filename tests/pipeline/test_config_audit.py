"""No silent options (issue #25): every field of the cycle config schema changes what the cycle builds from it, or
is refused where it would reach nothing. The walk reads the schema itself, so a new field without a probe fails it.

A probe builds, with the cycle's own functions, the object a field claims to set (a callback, the TRADES wrapper,
the Trainer, RONI's ScreeningConfig, a shard schema, the gate's verdict, ...) from the digits config and from the
same config with that one field changed; the two must differ. Nothing trains except the bootstrap probe's tiny fit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from pydantic import BaseModel

from trainguard.defenses import AdversarialTraining, ModelGate, RobustAccuracy
from trainguard.defenses.gate import GateVerdict
from trainguard.defenses.heldout import HeldoutMetrics, LabeledData
from trainguard.pipeline.config import Component, CycleConfig, parse_config, project_dir
from trainguard.pipeline.cycle import _decoders, _judge, _training_data, roni_holdout, screening_config
from trainguard.pipeline.detection import detection_config, run_detection
from trainguard.pipeline.errors import ConfigError
from trainguard.pipeline.intake import Intake, SignedShard, admit, manifest_refs, sample_schema, table_schema, validate
from trainguard.pipeline.plan import TrainingPlan
from trainguard.pipeline.preflight import _detector_features
from trainguard.pipeline.training import (
    TrainingResult,
    adversarial_method,
    bootstrap,
    defense_callbacks,
    fitted_module,
    trainer,
    user_callbacks,
)
from trainguard.provenance.allowlist import AllowList
from trainguard.provenance.formats import Samples
from trainguard.provenance.reader import ReadLog

DIGITS = Path(__file__).resolve().parents[2] / "configs" / "digits.yaml"
BASE: dict[str, Any] = yaml.safe_load(DIGITS.read_text())
BASE["project"] = str(DIGITS.parents[1] / "examples")
DELETE = object()

HOLDOUT = LabeledData(torch.rand(40, 64, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 10)
REGRESSION = {"task": {"kind": "regression"}, "validation.labels": [], "validation.targets": {"shape": [2]}}
MULTILABEL = {**REGRESSION, "task": {"kind": "multilabel"}, "validation.targets": {"shape": [2], "min": 0, "max": 1}}
TRADES_BASE = {"adversarial": {"attack": "trades", "eps": 0.1}}
PGD_BASE = {"adversarial": {"attack": "pgd", "eps": 0.1}}


def config(edits: dict[str, Any]) -> CycleConfig:
    """The digits config with `edits` (dotted key -> value, DELETE removes the key) validated as `load_config` does."""
    data = copy.deepcopy(BASE)
    for dotted, value in edits.items():
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = copy.deepcopy(value)
    return parse_config(data, source="audit")


def _shard(name: str, source: str, role: str, rows: int) -> SignedShard:
    frame = pd.DataFrame({f"pixel_{i}": np.full(rows, 0.5, np.float32) for i in range(4)})
    frame["label"] = np.arange(rows) % 10
    samples = Samples(frame[[f"pixel_{i}" for i in range(4)]].to_numpy(), frame["label"].to_numpy())
    return SignedShard(name, "0" * 64, source, role, "digits", "1" * 64, samples, frame, "keys")


FRAME = _shard("f", "s", "train", 10).frame
SHORT = _shard("short.parquet", "alice", "train", 5)
INTAKE = Intake(
    (),
    (),
    (_shard("base.parquet", "curator", "trusted", 20),),
    (_shard("b0.parquet", "bob", "train", 10), _shard("b1.parquet", "bob", "train", 10)),
    (),
    "",
)


def _callback(built: CycleConfig, kind: type) -> Any:
    return next(c for c in defense_callbacks(built, HOLDOUT, None) if isinstance(c, kind))


def _adversarial(built: CycleConfig) -> tuple[Any, ...]:
    a = _callback(built, AdversarialTraining)
    return (a.attack_name, a.eps, a.steps, a.step_size, a.norm, a.ratio, a.bounds, a.warmup_epochs, a.seed)


def _robust(built: CycleConfig) -> tuple[Any, ...]:
    r = _callback(built, RobustAccuracy)
    return (r.eps, r.max_samples, r.steps, r.attack_names, r.restarts, r.bounds)


def _gate(built: CycleConfig) -> tuple[Any, ...]:
    g = _callback(built, ModelGate)
    return (g.max_drop, g.max_class_drop, g.num_classes)


def _data(built: CycleConfig) -> tuple[Any, ...]:
    plan = TrainingPlan(1, (), AllowList.of(()), HOLDOUT, None, None)
    d = _training_data(built, plan)
    return (type(d.transform), type(d.val_transform), d.batch_size, d.num_workers, d.seed, d.label_column)


def _judged(built: CycleConfig) -> tuple[bool, str]:
    """The cycle's final verdict on a fit the gate accepted at 0.9 clean accuracy, robust 0.6 / 0.5 at 0.05 / 0.1."""
    metrics = HeldoutMetrics(0.3, 0.9, (), ())
    result = TrainingResult(
        GateVerdict(True, "within the gate's drops", metrics, metrics),
        {},
        ReadLog(),
        {"0": 0.9, "0.05": 0.6, "0.1": 0.5},
    )
    return _judge(built, result)


def _bootstrapped_epochs(built: CycleConfig) -> int:
    trusted = LabeledData(HOLDOUT.x[:8], HOLDOUT.y[:8])
    return bootstrap(built.model.instantiate(), built, trusted).current_epoch


@dataclass(frozen=True)
class Probe:
    """A field's changed value, what the cycle builds from a config (compared before and after the change), and the
    edits both configs need first (another task or attack)."""

    value: Any
    built: Callable[[CycleConfig], Any]
    base: dict[str, Any] = field(default_factory=dict)


_IDENTITY = {"class_path": "torch.nn.Identity"}
PROBES: dict[str, Probe] = {
    "name": Probe("other", lambda c: c.pipeline_identity),
    "project": Probe(str(DIGITS.parents[1] / "tests"), lambda c: project_dir(c, DIGITS)),
    "dataset.training": Probe(
        [{"manifest": "other.manifest.json", "dataset": "other"}], lambda c: [r.manifest for r in manifest_refs(c)]
    ),
    "dataset.holdout": Probe(
        {"manifest": "held.manifest.json", "dataset": "held"}, lambda c: [r.manifest for r in manifest_refs(c)]
    ),
    "dataset.trust": Probe("configs/other.yaml", lambda c: c.dataset.trust_of(c.dataset.holdout)),
    "validation.feature_columns": Probe(["pixel_1"], lambda c: table_schema(FRAME, c.validation).features),
    "validation.feature_pattern": Probe("pixel_1*", lambda c: table_schema(FRAME, c.validation).features),
    "validation.label_column": Probe("digit", lambda c: (table_schema(FRAME, c.validation).label, _data(c))),
    "validation.target_columns": Probe(["a", "b"], lambda c: table_schema(FRAME, c.validation).targets, REGRESSION),
    "validation.feature_min": Probe(-1.0, lambda c: sample_schema(c.validation)),
    "validation.feature_max": Probe(2.0, lambda c: sample_schema(c.validation)),
    "validation.input_shape": Probe([64], lambda c: sample_schema(c.validation)),
    "validation.labels": Probe([0, 1, 2], lambda c: (sample_schema(c.validation), screening_config(c))),
    "validation.targets.shape": Probe([3], lambda c: sample_schema(c.validation), REGRESSION),
    "validation.targets.min": Probe(-1.0, lambda c: sample_schema(c.validation), REGRESSION),
    "validation.targets.max": Probe(2.0, lambda c: sample_schema(c.validation), REGRESSION),
    "validation.min_rows": Probe(1, lambda c: len(validate([SHORT], c.validation)[0])),
    "data.decoders": Probe(
        {".npz": {"class_path": "trainguard.provenance.formats.arrays.NpzDecoder"}}, lambda c: sorted(_decoders(c))
    ),
    "data.transform": Probe(_IDENTITY, _data),
    "data.val_transform": Probe(_IDENTITY, _data),
    "limits.max_fraction_per_source": Probe(0.2, lambda c: len(admit(INTAKE, c)[0])),
    "task.kind": Probe("multilabel", lambda c: c.task.build(), {**MULTILABEL, "task": {"kind": "regression"}}),
    "task.tolerance": Probe(0.2, lambda c: c.task.build(), REGRESSION),
    "task.regression_loss": Probe("l1", lambda c: c.task.build(), REGRESSION),
    "task.multilabel_accuracy": Probe("per-label", lambda c: c.task.build(), MULTILABEL),
    "roni.enabled": Probe(False, screening_config),
    "roni.level": Probe(0.05, screening_config),
    "roni.error_control": Probe("bh", screening_config),
    "roni.calibration_draws": Probe(1000, screening_config),
    "roni.combination": Probe("stouffer", screening_config),
    "roni.options": Probe({"steps": 5}, screening_config),
    "roni.calibration_fraction": Probe(0.2, lambda c: len(roni_holdout(c, HOLDOUT)[0])),
    "detectors.enabled": Probe(False, lambda c: c.detectors_on),
    "detectors.detectors": Probe(["spectral"], lambda c: detection_config(c.detectors)),
    # with no rows to screen run_detection returns at once: the model and tracked stage go unused
    "detectors.action": Probe("report", lambda c: run_detection(c.detectors, None, [], [], None).report),  # type: ignore[arg-type]
    "detectors.alpha": Probe(0.05, lambda c: detection_config(c.detectors)),
    "detectors.feature_layer": Probe(
        "net.head.1", lambda c: _detector_features(c, c.model.instantiate(), HOLDOUT.x[:2])
    ),
    "detectors.spectral": Probe({"row_alpha": 0.05}, lambda c: detection_config(c.detectors)),
    "detectors.clustering": Probe({"components": 5}, lambda c: detection_config(c.detectors)),
    "detectors.label_issues": Probe({"folds": 3}, lambda c: detection_config(c.detectors)),
    "adversarial.enabled": Probe(False, lambda c: [type(x) for x in defense_callbacks(c, HOLDOUT, None)]),
    "adversarial.attack": Probe("fgsm", lambda c: (adversarial_method(c), _adversarial(c)), PGD_BASE),
    "adversarial.eps": Probe(0.2, _adversarial),
    "adversarial.steps": Probe(7, _adversarial),
    "adversarial.step_size": Probe(0.01, _adversarial),
    "adversarial.norm": Probe("2", _adversarial),
    "adversarial.ratio": Probe(0.25, _adversarial),
    "adversarial.bounds": Probe([-1.0, 2.0], lambda c: (_adversarial(c), _robust(c))),
    "adversarial.warmup_epochs": Probe(2.0, _adversarial),
    "adversarial.trades_beta": Probe(1.0, lambda c: fitted_module(c, c.model.instantiate()).beta, TRADES_BASE),
    "robust_eval.eps": Probe([0.0, 0.2], _robust),
    "robust_eval.subset_size": Probe(10, _robust),
    "robust_eval.steps": Probe(7, _robust),
    "robust_eval.attacks": Probe(["pgd", "apgd-ce"], _robust),
    "robust_eval.restarts": Probe(2, _robust, {"robust_eval.attacks": ["apgd-ce"]}),
    "gate.min_clean_accuracy": Probe(0.95, _judged),
    "gate.min_robust_accuracy": Probe(0.55, _judged),
    "gate.robust_eps": Probe(0.05, _judged, {"gate.min_robust_accuracy": 0.55}),
    "gate.max_accuracy_drop": Probe(0.1, _gate),
    "gate.max_class_drop": Probe(0.5, _gate),
    "training.batch_size": Probe(16, _data),
    "training.seed": Probe(7, lambda c: (_data(c), _adversarial(c))),
    "training.num_workers": Probe(2, _data),
    "training.bootstrap_epochs": Probe(2, _bootstrapped_epochs, {"training.bootstrap_epochs": 1}),
    "trainer": Probe(
        {"init_args": {"accelerator": "cpu", "gradient_clip_val": 0.5}},
        lambda c: trainer(c, [], None, 1).gradient_clip_val,
    ),
    "model": Probe(
        {"class_path": "digits_demo.models.DigitsClassifier", "init_args": {"channels": 4}},
        lambda c: c.model.instantiate().hparams.channels,
    ),
    "model_forward": Probe(
        "trainguard.defenses.forward.plain_forward", lambda c: _callback(c, AdversarialTraining).forward
    ),
    "callbacks": Probe(
        [{"class_path": "pytorch_lightning.callbacks.Timer"}], lambda c: [type(x) for x in user_callbacks(c)]
    ),
    "output.work_dir": Probe("elsewhere", lambda c: c.output.state_path),
    "output.model_signing_key": Probe(
        "other.key", lambda c: c.output.attestation_key_path, {"output.attestation_key": DELETE}
    ),
    "output.attestation_key": Probe("attest.key", lambda c: c.output.attestation_key_path),
    "output.state_file": Probe("state-elsewhere.json", lambda c: c.output.state_path),
    "tracking.uri": Probe("sqlite:///other.db", lambda c: c.tracking.resolved_uri()),
}

READ_AS_IS: dict[str, str] = {
    "dataset.allow_extra": "intake._verify passes it to verify_shards (tests/provenance/test_verify.py)",
    "limits.max_decoded_bytes": "verify_and_read's decoding ceiling (tests/pipeline/test_intake.py)",
    "training.rank_timeout": "distributed.join's timeout under a launcher (tests/pipeline/test_distributed_cycle.py)",
    "tracking.experiment_name": "CycleTracker.connect (tests/pipeline/test_tracking.py)",
    "tracking.registered_model_name": "CycleTracker.connect (tests/pipeline/test_tracking.py)",
}
"""Fields handed as they are to code that needs real signed data, a launcher or an MLflow server to observe; the
tests named prove they reach it."""

# (field, the edits that make it reach nothing, the value written): each must be refused at load, naming the field
REFUSED: list[tuple[str, dict[str, Any], Any]] = [
    ("adversarial.ratio", TRADES_BASE, 0.5),
    ("adversarial.warmup_epochs", TRADES_BASE, 1.0),
    ("adversarial.trades_beta", PGD_BASE, 3.0),
    ("adversarial.steps", {"adversarial": {"attack": "fgsm"}}, 3),
    ("adversarial.step_size", {"adversarial": {"attack": "fgsm"}}, 0.05),
    ("adversarial.steps", {"adversarial": {"attack": "fgsm-rs"}}, 3),
    ("robust_eval.restarts", {"robust_eval.attacks": ["pgd"]}, 2),
    ("task.tolerance", {}, 0.2),
    ("task.regression_loss", {}, "l1"),
    ("task.multilabel_accuracy", REGRESSION, "per-label"),
    ("gate.robust_eps", {}, 0.07),
]


def schema_fields(model: type[BaseModel] = CycleConfig, prefix: str = "") -> Iterator[str]:
    """Every leaf field's dotted path: sections are walked, components and manifest references are leaves."""
    for name, info in model.model_fields.items():
        sections = [
            t
            for t in (info.annotation, *get_args(info.annotation))
            if isinstance(t, type) and issubclass(t, BaseModel) and not issubclass(t, Component)
        ]
        if sections:
            yield from schema_fields(sections[0], f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


@pytest.fixture(autouse=True)
def _no_tracking_uri_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_every_field_of_the_schema_has_a_probe() -> None:
    fields = set(schema_fields())
    assert not fields & set(READ_AS_IS) & set(PROBES)
    assert fields == set(PROBES) | set(READ_AS_IS), "a new config field needs a probe here (or a refusal)"
    assert {path for path, _, _ in REFUSED} <= fields


@pytest.mark.parametrize("path", sorted(PROBES))
def test_changing_a_field_changes_what_the_cycle_builds(path: str) -> None:
    probe = PROBES[path]
    before = probe.built(config(probe.base))
    assert probe.built(config(probe.base)) == before, "the probe builds the same thing from the same config"
    after = probe.built(config({**probe.base, path: probe.value}))
    assert before != after, f"{path}: {probe.value!r} changed nothing the cycle builds"


@pytest.mark.parametrize(("path", "base", "value"), REFUSED, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(REFUSED)])
def test_a_field_that_would_reach_nothing_is_refused_by_name(path: str, base: dict[str, Any], value: Any) -> None:
    config(base)  # the context alone loads
    with pytest.raises(ConfigError) as refused:
        config({**base, path: value})
    assert refused.value.key == path and "\n" not in str(refused.value)
