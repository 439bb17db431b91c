"""The retraining pipeline: the `trainguard` CLI, cycle configs, the cycle itself, MLflow tracking, model signing
and attestations. Its error family and the root of every trainguard error are importable from here."""

from trainguard.errors import TrainguardError
from trainguard.pipeline.errors import PipelineError

__all__ = ["PipelineError", "TrainguardError"]
