"""Training-time defenses for any supervised task: attacks and adversarial training, robust accuracy, RONI screening,
the before/after model gate, row-level poisoning detectors (spectral signatures, activation clustering, label
issues), shard validation, per-source caps and margin checks.

Names are imported on first use, so `import trainguard.defenses.errors` (the CLI's error mapping) does not load torch.
"""

from __future__ import annotations

from trainguard.lazy import lazy_getattr

_LAZY = {
    "TrainguardError": "trainguard.errors",
    "DefenseError": "trainguard.defenses.errors",
    "AdversarialTraining": "trainguard.defenses.adversarial",
    "OverfittingGuard": "trainguard.defenses.overfitting",
    "RobustAccuracy": "trainguard.defenses.robust",
    "correct_under_attacks": "trainguard.defenses.robust",
    "TRADES": "trainguard.defenses.trades",
    "GateVerdict": "trainguard.defenses.gate",
    "ModelGate": "trainguard.defenses.gate",
    "ClusteringConfig": "trainguard.defenses.clustering",
    "detect_clustering": "trainguard.defenses.clustering",
    "DetectionConfig": "trainguard.defenses.detectors",
    "Detections": "trainguard.defenses.detectors",
    "detect": "trainguard.defenses.detectors",
    "Findings": "trainguard.defenses.findings",
    "RowFinding": "trainguard.defenses.findings",
    "SourceFinding": "trainguard.defenses.findings",
    "LabelIssuesConfig": "trainguard.defenses.label_issues",
    "detect_label_issues": "trainguard.defenses.label_issues",
    "SpectralConfig": "trainguard.defenses.spectral",
    "detect_spectral": "trainguard.defenses.spectral",
    "HeldoutMetrics": "trainguard.defenses.heldout",
    "LabeledData": "trainguard.defenses.heldout",
    "heldout_metrics": "trainguard.defenses.heldout",
    "capped_rows": "trainguard.defenses.limits",
    "check_source_caps": "trainguard.defenses.limits",
    "enforce_source_caps": "trainguard.defenses.limits",
    "check_margins": "trainguard.defenses.margin",
    "compare_margins": "trainguard.defenses.margin",
    "ScreeningFiles": "trainguard.defenses.report",
    "write_screening": "trainguard.defenses.report",
    "Calibration": "trainguard.defenses.roni",
    "Candidate": "trainguard.defenses.roni",
    "CandidateDecision": "trainguard.defenses.roni",
    "ScreeningConfig": "trainguard.defenses.roni",
    "ScreeningReport": "trainguard.defenses.roni",
    "SourceDecision": "trainguard.defenses.roni",
    "screen_candidates": "trainguard.defenses.roni",
    "combined": "trainguard.defenses.conformal",
    "conformal_p_values": "trainguard.defenses.conformal",
    "rejected": "trainguard.defenses.conformal",
    "batch_input": "trainguard.defenses.forward",
    "Task": "trainguard.defenses.task",
    "as_task": "trainguard.defenses.task",
    "Shard": "trainguard.defenses.validation",
    "ShardSchema": "trainguard.defenses.validation",
    "ShardVerdict": "trainguard.defenses.validation",
    "validate_shards": "trainguard.defenses.validation",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
