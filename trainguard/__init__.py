"""trainguard: defense in depth inside the training loop — signed data shards, adversarial training, RONI checks.

The installed packages are `trainguard.provenance`, `trainguard.defenses` and `trainguard.pipeline`; the names users
need most are re-exported here and imported on first use, so `import trainguard` loads neither torch nor Lightning.
"""

from __future__ import annotations

from trainguard.lazy import lazy_getattr

_LAZY = {
    "AdversarialTraining": "trainguard.defenses",
    "DefenseError": "trainguard.defenses.errors",
    "ModelGate": "trainguard.defenses",
    "RobustAccuracy": "trainguard.defenses",
    "ScreeningConfig": "trainguard.defenses",
    "TRADES": "trainguard.defenses",
    "Task": "trainguard.defenses",
    "screen_candidates": "trainguard.defenses",
    "ProvenanceError": "trainguard.provenance",
    "ShardDataset": "trainguard.provenance",
    "ShardReader": "trainguard.provenance",
    "TrustPolicy": "trainguard.provenance",
    "VerifiedDataModule": "trainguard.provenance",
    "VerifyDatasetCallback": "trainguard.provenance",
    "load_trust": "trainguard.provenance",
    "sign_dataset": "trainguard.provenance",
    "verify_dataset": "trainguard.provenance",
    "CycleConfig": "trainguard.pipeline.config",
    "PipelineError": "trainguard.pipeline.errors",
    "TrainguardError": "trainguard.errors",
    "load_config": "trainguard.pipeline.config",
    "load_model": "trainguard.pipeline.mlflow_model",
    "preflight": "trainguard.pipeline.preflight",
    "run_cycle": "trainguard.pipeline.cycle",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
