"""Training-time defenses: attacks and adversarial training, robust accuracy, RONI screening and gate, shard
validation, per-source caps and margin checks.

Names are imported on first use, so `import defenses.errors` (the CLI's error mapping) does not load torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "AdversarialTraining": "defenses.adversarial",
    "RobustAccuracy": "defenses.robust",
    "TRADES": "defenses.trades",
    "GateVerdict": "defenses.gate",
    "RONIGate": "defenses.gate",
    "HeldoutMetrics": "defenses.heldout",
    "LabeledData": "defenses.heldout",
    "heldout_metrics": "defenses.heldout",
    "capped_rows": "defenses.limits",
    "check_source_caps": "defenses.limits",
    "enforce_source_caps": "defenses.limits",
    "check_margins": "defenses.margin",
    "compare_margins": "defenses.margin",
    "ReportOutcome": "defenses.report",
    "record_screening": "defenses.report",
    "Candidate": "defenses.roni",
    "CandidateDecision": "defenses.roni",
    "ScreeningConfig": "defenses.roni",
    "ScreeningReport": "defenses.roni",
    "screen_candidates": "defenses.roni",
    "Shard": "defenses.validation",
    "ShardSchema": "defenses.validation",
    "ShardVerdict": "defenses.validation",
    "validate_shards": "defenses.validation",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'defenses' has no attribute {name!r}")
