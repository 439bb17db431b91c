"""trainguard: defense in depth inside the training loop — signed data shards, adversarial training, RONI checks.

The installed packages are `trainguard.provenance`, `trainguard.defenses` and `trainguard.pipeline`; the names users
need most are re-exported here and imported on first use, so `import trainguard` loads neither torch nor Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainguard.lazy import lazy_getattr

# What each lazy name is, for type checkers and IDEs (to them `__getattr__` alone makes every name Any).
if TYPE_CHECKING:
    from trainguard.defenses import TRADES as TRADES
    from trainguard.defenses import AdversarialTraining as AdversarialTraining
    from trainguard.defenses import ModelGate as ModelGate
    from trainguard.defenses import RobustAccuracy as RobustAccuracy
    from trainguard.defenses import ScreeningConfig as ScreeningConfig
    from trainguard.defenses import Task as Task
    from trainguard.defenses import screen_candidates as screen_candidates
    from trainguard.defenses.errors import DefenseError as DefenseError
    from trainguard.errors import TrainguardError as TrainguardError
    from trainguard.pipeline.config import CycleConfig as CycleConfig
    from trainguard.pipeline.config import load_config as load_config
    from trainguard.pipeline.cycle import run_cycle as run_cycle
    from trainguard.pipeline.errors import PipelineError as PipelineError
    from trainguard.pipeline.mlflow_model import load_model as load_model
    from trainguard.pipeline.preflight import preflight as preflight
    from trainguard.provenance import ProvenanceError as ProvenanceError
    from trainguard.provenance import ShardDataset as ShardDataset
    from trainguard.provenance import ShardReader as ShardReader
    from trainguard.provenance import TrustPolicy as TrustPolicy
    from trainguard.provenance import VerifiedDataModule as VerifiedDataModule
    from trainguard.provenance import VerifyDatasetCallback as VerifyDatasetCallback
    from trainguard.provenance import load_trust as load_trust
    from trainguard.provenance import sign_dataset as sign_dataset
    from trainguard.provenance import verify_dataset as verify_dataset

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
