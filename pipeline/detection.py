"""The cycle's row-level detection stage: spectral signatures, activation clustering and label issues on the incoming
model's penultimate features, per source, each detector calibrated on the held-out rows (clean, never trained on).

The pool is every contributed shard that may still be trained on (accepted in earlier cycles, or new), so evidence
against a source accumulates across its shards and across cycles, and a quarantine is decided afresh each cycle
with the current model. What the config's action does: `quarantine-rows` names the flagged rows training must skip
(per shard; the data module drops them after the verified read, and the attestation lists them), `reject-source`
refuses every shard of a flagged source, `report` changes nothing. Whatever the action, the label-issue detector's
per-source p-values are `evidence` for RONI's source test (`screen_candidates(evidence=...)`): a source whose flips
are too few for either test alone can fail their combination.

Rows that shards of several sources share are skipped too (`copied_rows`), whether or not the detectors run: the
copier's rows, and a copied shard's copied rows only, never a whole shard someone copied from.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from trainguard.defenses.clustering import ClusteringConfig
from trainguard.defenses.detectors import REFERENCE, DetectionConfig, Detections, detect
from trainguard.defenses.duplicates import Rows, Standing, shared_rows
from trainguard.defenses.features import head_features, split_head
from trainguard.defenses.label_issues import LabelIssuesConfig
from trainguard.defenses.spectral import SpectralConfig
from trainguard.pipeline.config import DetectorsSection
from trainguard.pipeline.cycle_report import DetectionSection, decision_rows, detections_section
from trainguard.pipeline.cycle_state import CycleState, ShardDecision
from trainguard.pipeline.intake import SignedShard
from trainguard.pipeline.tracking import TrackedRun


@dataclass(frozen=True)
class DetectionOutcome:
    """The stage's decisions: shards refused (reject-source), rows to skip (quarantine-rows: shard key -> rows in
    that shard), the report section and its summary metrics, and per source the p-values RONI's source test
    combines with its own (`roni_evidence`)."""

    rejected: tuple[ShardDecision, ...]
    excluded_rows: Mapping[str, tuple[int, ...]]
    report: DetectionSection
    metrics: dict[str, float]
    evidence: Mapping[str, tuple[float, ...]] = field(default_factory=dict)


def detection_config(section: DetectorsSection) -> DetectionConfig:
    return DetectionConfig(
        detectors=section.detectors,
        spectral=SpectralConfig(**section.spectral),
        clustering=ClusteringConfig(**section.clustering),
        label_issues=LabelIssuesConfig(**section.label_issues),
        alpha=section.alpha,
    )


def roni_evidence(detections: Detections) -> dict[str, tuple[float, ...]]:
    """Each source's label-issue p-value (its flagged rows against the reference's per-class rates, so a clean
    source of a few hard classes adds no false evidence), for RONI to combine with its
    shard tests: flipped labels are what both tests see, each weakly when the flips are few. Spectral signatures and
    activation clustering stay out: they look for backdoors the incoming model learned, which fine-tuning impacts do
    not measure, and every added p-value that carries no signal weakens the combination."""
    return {
        s.source: (s.p_value,)
        for findings in detections.findings
        if findings.detector == "label-issues"
        for s in findings.sources
    }


def model_view(
    model: nn.Module, shards: Sequence[Sequence[np.ndarray]], feature_layer: str | None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Penultimate features and softmax probabilities of the model on each group of inputs (one pass each)."""
    split = split_head(model, feature_layer)
    tensors = [torch.as_tensor(np.concatenate(group), dtype=torch.float32) for group in shards]
    features = head_features(model, split, tensors)
    was_training = split.head.training
    split.head.eval()
    with torch.no_grad():
        probabilities = [torch.softmax(split.head(f.to(next(model.parameters()).device)), 1).cpu() for f in features]
    split.head.train(was_training)
    return [f.numpy() for f in features], [p.numpy() for p in probabilities]


def run_detection(
    section: DetectorsSection,
    model: nn.Module,
    reference: Sequence[SignedShard],
    pool: Sequence[SignedShard],
    stage: TrackedRun,
) -> DetectionOutcome:
    """Runs the configured detectors on `pool` against the `reference` rows, logs a table per detector and a few
    metrics to `stage`, and returns what the config's action decides."""
    if not pool:
        return DetectionOutcome((), {}, {"action": section.action, "shards": 0}, {})
    (ref_features, features), (ref_probs, probs) = model_view(
        model, [[s.samples.inputs for s in reference], [s.samples.inputs for s in pool]], section.feature_layer
    )
    owners = [(shard, row) for shard in pool for row in range(len(shard.samples))]
    labels = np.concatenate([s.samples.targets for s in (*reference, *pool)])
    sources = [REFERENCE] * len(ref_features) + [shard.source for shard, _ in owners]
    detections = detect(
        np.concatenate([ref_features, features]),
        labels,
        sources,
        detection_config(section),
        pred_probs=np.concatenate([ref_probs, probs]),
    )
    offset = len(ref_features)
    flagged: dict[str, list[int]] = defaultdict(list)
    for row in sorted(detections.flagged_rows):
        shard, index = owners[row - offset]
        flagged[shard.key].append(index)
    for findings in detections.findings:
        stage.log_table(_table(findings.rows, owners, offset), f"detection/{findings.detector}.json")
    rejected = _rejections(pool, detections) if section.action == "reject-source" else ()
    excluded = {k: tuple(v) for k, v in sorted(flagged.items())} if section.action == "quarantine-rows" else {}
    metrics = {f"detection/{f.detector}/flagged_rows": float(len(f.flagged_rows)) for f in detections.findings}
    metrics |= {f"detection/{f.detector}/flagged_sources": float(len(f.flagged_sources)) for f in detections.findings}
    metrics |= {f"detection/{f.detector}/clean_rate": f.clean_rate for f in detections.findings}
    metrics |= {
        "detection/quarantined_rows": float(sum(map(len, excluded.values()))),
        "detection/rejected_shards": float(len(rejected)),
    }
    stage.log_metrics(metrics)
    report: DetectionSection = {
        "action": section.action,
        "shards": len(pool),
        "rows": len(owners),
        "reference_rows": offset,
    }
    report.update(detections_section(detections))
    report.update(
        {
            "flagged": {k: list(v) for k, v in sorted(flagged.items())},
            "quarantined_rows": {k: list(v) for k, v in excluded.items()},
            "rejected": decision_rows(rejected),
        }
    )
    return DetectionOutcome(tuple(rejected), excluded, report, metrics, roni_evidence(detections))


def _table(rows: Sequence[Any], owners: Sequence[tuple[SignedShard, int]], offset: int) -> dict[str, list[Any]]:
    """One detector's row findings as columns: shard, row within it, source, label, score, flagged."""
    where = [owners[r.row - offset] for r in rows]
    return {
        "shard": [shard.key for shard, _ in where],
        "row": [index for _, index in where],
        "source": [r.source for r in rows],
        "label": [r.label for r in rows],
        "score": [r.score for r in rows],
        "flagged": [r.flagged for r in rows],
    }


def _rejections(pool: Sequence[SignedShard], detections: Detections) -> tuple[ShardDecision, ...]:
    """A refusal of every shard of each flagged source, naming the detectors and their q-values."""
    why: dict[str, list[str]] = defaultdict(list)
    for findings in detections.findings:
        for source in findings.sources:
            if source.flagged:
                why[source.source].append(
                    f"{findings.detector} flagged {source.flagged_rows}/{source.rows} rows "
                    f"({source.expected:.1f} expected of clean rows of its classes, q={source.q_value:.2g})"
                )
    return tuple(
        ShardDecision(
            shard=s.key,
            sha256=s.sha256,
            source=s.source,
            accepted=False,
            check="detection",
            reason=f"source {s.source}: " + "; ".join(why[s.source]),
        )
        for s in pool
        if s.source in why
    )


def copied_rows(shards: Sequence[SignedShard], state: CycleState) -> dict[str, tuple[int, ...]]:
    """The rows of `shards` (`dataset:name` -> rows) training must skip because shards of other sources hold the
    same inputs: trusted shards keep theirs, then shards whose content an earlier cycle accepted (of one source), and
    every other holder drops them (`trainguard.defenses.duplicates`); a copy never evicts a shard."""
    accepted = accepted_before(state)
    return shared_rows([Rows(s.key, s.source, s.samples.inputs, _standing(s, accepted)) for s in shards])


def merged_rows(*rows: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """Rows to skip from several stages, per shard key: each row once, in order."""
    keys = sorted({key for each in rows for key in each})
    return {key: tuple(sorted({row for each in rows for row in each.get(key, ())})) for key in keys}


def accepted_before(state: CycleState) -> Collection[tuple[str, str]]:
    """(shard key, sha256) of each shard content whose latest decision before the running cycle accepted it."""
    latest = {d.key: d.accepted for record in state.cycles[:-1] for d in record.shards}
    return {key for key, accepted in latest.items() if accepted}


def _standing(shard: SignedShard, accepted: Collection[tuple[str, str]]) -> Standing:
    if shard.role == "trusted":
        return Standing.TRUSTED
    return Standing.ACCEPTED if (shard.key, shard.sha256) in accepted else Standing.NEW
