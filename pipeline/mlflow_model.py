"""The accepted model as an MLflow pyfunc model, from code (never a pickle), that verifies itself when loaded.

The MLflow model holds the signed model directory (safetensors weights, `model.json`, the OpenSSF model signature and
the SLSA attestation) and the public keys as artifacts, the input/output schema as its signature, and
`mlflow_model_code.py` as its code. `load_context` runs the same checks as `trainguard verify-model` (signature,
attestation, subjects) and raises, so `mlflow.pyfunc.load_model` refuses a model whose bytes do not check. The
bundled keys prove integrity; to anchor trust in a key you hold, pass `model_config={"public_key": PATH}` (or set
TRAINGUARD_MODEL_KEY).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from trainguard.pipeline.errors import ModelSignatureError
from trainguard.pipeline.model_sign import MODEL_FILE, read_model_description
from trainguard.pipeline.model_verification import ModelVerification, verify_model

CODE_FILE = Path(__file__).with_name("mlflow_model_code.py")
SIGNED_MODEL = "signed_model"
MODEL_KEY = "model_key"
ATTESTATION_KEY = "attestation_key"
KEY_ENV = "TRAINGUARD_MODEL_KEY"
CONFIG_KEYS = ("public_key", "attestation_key")
CHAMPION = "champion"


class VerifiedModel(mlflow.pyfunc.PythonModel):
    """Predicts with a model verified when it loads, as its signed `model.json` says: for its task (class labels
    and their probability, 0/1 labels, real outputs) and through its `model_forward` hook when it has one."""

    verification: ModelVerification
    keys: tuple[Path, Path]
    module: Any
    task: str = "classification"
    forward: Any = None

    def load_context(self, context: Any) -> None:
        self.keys = trusted_keys(context.artifacts, context.model_config or {})
        directory = Path(context.artifacts[SIGNED_MODEL])
        self.verification = verify_model(directory, None, self.keys[0], [self.keys[1]])
        self.module = _rebuild(directory, self.verification.model_sha256)
        self.task, self.forward = _serving(directory)

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Per input row (checked against the model's signature, a float32 tensor spec, before it gets here): a
        classifier's `label` (int64) and its `probability`; a multi-label model's `label_<i>` (0/1); a regression
        model's `output` (or `output_<i>`)."""
        import torch

        values = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else np.asarray(model_input)
        x = torch.as_tensor(values, dtype=torch.float32)
        with torch.no_grad():
            outputs = self.forward(self.module, {"x": x}, x) if self.forward is not None else self.module(x)
        return predictions(self.task, outputs)


def predictions(task: str, outputs: Any) -> pd.DataFrame:
    """The DataFrame a served model returns for its task's `outputs` (pure: see `VerifiedModel.predict`)."""
    import torch

    if task == "classification":
        best, labels = torch.softmax(outputs, dim=-1).max(dim=-1)
        return pd.DataFrame({"label": labels.numpy().astype(np.int64), "probability": best.numpy()})
    rows = outputs.reshape(outputs.shape[0], -1)
    if task == "multilabel":
        return pd.DataFrame({f"label_{i}": (rows[:, i] > 0).numpy().astype(np.int64) for i in range(rows.shape[1])})
    if rows.shape[1] == 1:
        return pd.DataFrame({"output": rows[:, 0].numpy()})
    return pd.DataFrame({f"output_{i}": rows[:, i].numpy() for i in range(rows.shape[1])})


def trusted_keys(artifacts: Mapping[str, str], model_config: Mapping[str, Any]) -> tuple[Path, Path]:
    """The model-signing and attestation public keys to verify against: the caller's (model_config, then
    TRAINGUARD_MODEL_KEY), else the ones bundled with the model."""
    chosen = model_config.get("public_key") or os.environ.get(KEY_ENV)
    model_key = Path(chosen) if chosen else Path(artifacts[MODEL_KEY])
    attestation = model_config.get("attestation_key") or (chosen or artifacts.get(ATTESTATION_KEY))
    return model_key, Path(attestation) if attestation else model_key


def _rebuild(directory: Path, model_sha256: str) -> Any:
    """The module named by the signed `model.json`, with the verified weights (read once, digest rechecked)."""
    from safetensors.torch import load

    from trainguard.pipeline.config import Component

    data = (directory / MODEL_FILE).read_bytes()
    if hashlib.sha256(data).hexdigest() != model_sha256:
        raise ModelSignatureError(f"{directory / MODEL_FILE}: changed after it was verified", path=str(directory))
    description = read_model_description(directory)
    module = Component(class_path=description["class_path"], init_args=description["init_args"]).instantiate()
    module.load_state_dict(load(data))
    return module.eval()


def _serving(directory: Path) -> tuple[str, Any]:
    """The task and the `model_forward` hook (imported) the signed `model.json` names (older models: a classifier
    called on its input)."""
    import importlib

    metadata = read_model_description(directory).get("metadata") or {}
    hook = metadata.get("model_forward")
    if not hook:
        return str(metadata.get("task", "classification")), None
    module, _, name = str(hook).rpartition(".")
    return str(metadata.get("task", "classification")), getattr(importlib.import_module(module), name)


def save_pyfunc(
    model_dir: Path, model_key: Path, attestation_key: Path, example: np.ndarray, destination: Path
) -> Path:
    """Writes the MLflow model for a signed model directory at `destination` (its input schema from `example`)."""
    from mlflow.models import infer_signature

    task = (read_model_description(model_dir).get("metadata") or {}).get("task", "classification")
    output = (  # other tasks' output columns depend on the model's output width: their signature is the input's
        pd.DataFrame({"label": np.zeros(1, dtype=np.int64), "probability": np.zeros(1, dtype=np.float32)})
        if task == "classification"
        else None
    )
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        keys = {MODEL_KEY: Path(scratch) / "model-key.pub", ATTESTATION_KEY: Path(scratch) / "attestation-key.pub"}
        shutil.copyfile(model_key, keys[MODEL_KEY])
        shutil.copyfile(attestation_key, keys[ATTESTATION_KEY])
        mlflow.pyfunc.save_model(
            path=str(destination),
            python_model=str(CODE_FILE),
            model_config=dict.fromkeys(CONFIG_KEYS, ""),  # declared, so a loader may override them
            artifacts={SIGNED_MODEL: str(model_dir), **{name: str(path) for name, path in keys.items()}},
            signature=infer_signature(np.asarray(example, dtype=np.float32), output),
            pip_requirements=_requirements(),
        )
    return destination


def _requirements() -> list[str]:
    """Pinned requirements (no inference subprocess): trainguard and the libraries the model code imports."""
    pins = []
    for package in ("trainguard", "torch", "safetensors", "model-signing", "mlflow"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def model_uri(model: str) -> str:
    """`models:/NAME@champion` for a bare registered-model name; URIs and paths as given."""
    if "://" in model or model.startswith(("models:/", "runs:/")) or Path(model).exists():
        return model
    return f"models:/{model}@{CHAMPION}"


def load_model(
    model: str, *, key: Path | str | None = None, attestation_key: Path | str | None = None
) -> mlflow.pyfunc.PyFuncModel:
    """Loads a trainguard model (registered name -> its champion, or any MLflow model URI), verified on load with
    `key` (default: the bundled key); raises ModelSignatureError or AttestationError when it does not check."""
    asked = {"public_key": key, "attestation_key": attestation_key or key}
    config = {name: str(path) for name, path in asked.items() if path is not None}
    loaded = mlflow.pyfunc.load_model(model_uri(model), model_config=config or None)
    used = loaded.unwrap_python_model()
    if not isinstance(used, VerifiedModel):
        raise ModelSignatureError(f"{model}: not a trainguard model (no verify-on-load)", path=model)
    if key is not None and used.keys != (Path(key), Path(attestation_key or key)):
        raise ModelSignatureError(f"{model}: was not verified with {key} (the model ignores caller keys)", path=model)
    return loaded
