"""Training-time defenses for any supervised task: attacks and adversarial training, robust accuracy, RONI screening,
the before/after model gate, row-level poisoning detectors (spectral signatures, activation clustering, label
issues), shard validation, per-source caps and margin checks.

Names are imported on first use, so `import trainguard.defenses.errors` (the CLI's error mapping) does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainguard.lazy import lazy_getattr

# What each lazy name is, for type checkers and IDEs (to them `__getattr__` alone makes every name Any).
if TYPE_CHECKING:
    from trainguard.defenses.adversarial import AdversarialTraining as AdversarialTraining
    from trainguard.defenses.clustering import ClusteringConfig as ClusteringConfig
    from trainguard.defenses.clustering import detect_clustering as detect_clustering
    from trainguard.defenses.conformal import combined as combined
    from trainguard.defenses.conformal import conformal_p_values as conformal_p_values
    from trainguard.defenses.conformal import rejected as rejected
    from trainguard.defenses.detectors import DetectionConfig as DetectionConfig
    from trainguard.defenses.detectors import Detections as Detections
    from trainguard.defenses.detectors import detect as detect
    from trainguard.defenses.errors import DefenseError as DefenseError
    from trainguard.defenses.findings import Findings as Findings
    from trainguard.defenses.findings import RowFinding as RowFinding
    from trainguard.defenses.findings import SourceFinding as SourceFinding
    from trainguard.defenses.forward import batch_input as batch_input
    from trainguard.defenses.gate import GateVerdict as GateVerdict
    from trainguard.defenses.gate import ModelGate as ModelGate
    from trainguard.defenses.heldout import HeldoutMetrics as HeldoutMetrics
    from trainguard.defenses.heldout import LabeledData as LabeledData
    from trainguard.defenses.heldout import heldout_metrics as heldout_metrics
    from trainguard.defenses.label_issues import LabelIssuesConfig as LabelIssuesConfig
    from trainguard.defenses.label_issues import detect_label_issues as detect_label_issues
    from trainguard.defenses.limits import capped_rows as capped_rows
    from trainguard.defenses.limits import check_source_caps as check_source_caps
    from trainguard.defenses.limits import enforce_source_caps as enforce_source_caps
    from trainguard.defenses.margin import check_margins as check_margins
    from trainguard.defenses.margin import compare_margins as compare_margins
    from trainguard.defenses.overfitting import OverfittingGuard as OverfittingGuard
    from trainguard.defenses.report import ScreeningFiles as ScreeningFiles
    from trainguard.defenses.report import write_screening as write_screening
    from trainguard.defenses.robust import RobustAccuracy as RobustAccuracy
    from trainguard.defenses.robust import correct_under_attacks as correct_under_attacks
    from trainguard.defenses.roni import Calibration as Calibration
    from trainguard.defenses.roni import Candidate as Candidate
    from trainguard.defenses.roni import CandidateDecision as CandidateDecision
    from trainguard.defenses.roni import ScreeningConfig as ScreeningConfig
    from trainguard.defenses.roni import ScreeningReport as ScreeningReport
    from trainguard.defenses.roni import SourceDecision as SourceDecision
    from trainguard.defenses.roni import screen_candidates as screen_candidates
    from trainguard.defenses.spectral import SpectralConfig as SpectralConfig
    from trainguard.defenses.spectral import detect_spectral as detect_spectral
    from trainguard.defenses.task import Task as Task
    from trainguard.defenses.task import as_task as as_task
    from trainguard.defenses.trades import TRADES as TRADES
    from trainguard.defenses.validation import Shard as Shard
    from trainguard.defenses.validation import ShardSchema as ShardSchema
    from trainguard.defenses.validation import ShardVerdict as ShardVerdict
    from trainguard.defenses.validation import validate_shards as validate_shards
    from trainguard.errors import TrainguardError as TrainguardError

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
