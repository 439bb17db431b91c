"""MLflow's loader for a trainguard model, where trainguard may not be installed (`mlflow models serve` in a fresh
environment): `save_pyfunc` copies this file into the model's `code` folder as `trainguard_mlflow_loader.py`, with
trainguard's own modules beside it in `trainguard.zip`. It imports an installed trainguard where there is one, else
the bundled copy, and hands over to `trainguard.pipeline.mlflow_model`, which verifies the signed model before any
of the model's code runs. It imports nothing from trainguard until MLflow calls it.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BUNDLE = "trainguard.zip"
MODULE = "trainguard_mlflow_loader"


def _load_pyfunc(data_path: str, model_config: Mapping[str, Any] | None = None) -> Any:
    """MLflow's entry point (the pyfunc's `loader_module`): the verified model under `data_path`."""
    if importlib.util.find_spec("trainguard") is None:
        sys.path.append(str(Path(__file__).with_name(BUNDLE)))
    from trainguard.pipeline import mlflow_model

    return mlflow_model._load_pyfunc(data_path, model_config)
