"""The accepted model in MLflow, and loading a registered version with trust anchored in a key the caller pins.

`trainguard.load_model(NAME, key=PUB)` (and `trainguard load-model`) is the safe way to load a registered model. It
downloads the version's signed model directory as plain files, verifies it against the caller's key (never a key
shipped with the artifacts) and its attestation, checks that its weights are the ones the registry recorded for the
version (`trainguard.model_sha256`) and that the attestation's cycle is the version's (`trainguard.cycle`), refuses
a `champion` alias that points behind the newest version trainguard registered, and only then builds the module
(the class the signed `model.json` names, safetensors weights). The model's own code travels signed in the
directory's `code/` (see `trainguard.pipeline.model_code`) and goes on `sys.path` only once it verified; nothing
else from the artifact store is imported or executed, and nothing is unpickled.

`mlflow.pyfunc.load_model(URI)` (and `mlflow models serve`/`predict`) keeps working as a convenience, also where
neither trainguard nor the project is installed, but it trusts the artifact store, by MLflow's design: it reads the
`MLmodel` file from the artifacts and imports or runs what that file names (a loader module, `code` paths put first
on `sys.path`, a python_model from code or from a pickle) before trainguard gets control. trainguard logs the model
with trainguard's own code in its `code` folder (`trainguard.pipeline.mlflow_loader`: an installed trainguard
first, else the bundled copy; the requirements, pinned, are trainguard's) and this module's loader, which
verifies the signed directory before the model's code runs, with the caller's key when one is given
(`model_config={"public_key": PATH}` or TRAINGUARD_MODEL_KEY) and else with the key bundled in the artifacts.
Whoever can write the artifact store can rewrite `MLmodel` or the bundled trainguard to run their own code, or
re-sign the model and bundle their key; and nothing ties what `mlflow.pyfunc` loads to the version the registry
recorded.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import requires as distribution_requires
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trainguard.pipeline.errors import ModelSignatureError, RegistryError
from trainguard.pipeline.model_code import find_model_code, model_imports, module_sources, pinned, use_verified_code
from trainguard.pipeline.model_sign import MODEL_FILE, read_model_description
from trainguard.pipeline.model_verification import ModelVerification, verify_model

DATA = "trainguard"  # the pyfunc's data directory, data/trainguard: the signed model and the keys beside it
SIGNED_MODEL = "signed_model"
SIGNED_PATH = f"data/{DATA}/{SIGNED_MODEL}"
MODEL_KEY_FILE = "model-key.pub"
ATTESTATION_KEY_FILE = "attestation-key.pub"
KEY_ENV = "TRAINGUARD_MODEL_KEY"
CONFIG_KEYS = ("public_key", "attestation_key")
CHAMPION = "champion"
MODEL_SHA256_TAG = "trainguard.model_sha256"
CYCLE_TAG = "trainguard.cycle"
# The package roots pyproject maps (package-dir): an editable install finds them in separate folders, so walking
# trainguard/ alone would miss them.
_PACKAGES = ("trainguard", "trainguard.provenance", "trainguard.defenses", "trainguard.pipeline")
_MODEL_REF = re.compile(r"models:/(?P<name>[^/:@]+)(?:@(?P<alias>[^/:@]+)|/(?P<version>[1-9][0-9]*))")


@dataclass(frozen=True)
class ModelRef:
    """A registered model version as asked for: through an alias (a bare name means its `champion`) or by number."""

    name: str
    alias: str | None = None
    version: int | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class RegisteredVersion:
    """What the registry recorded for a version trainguard registered: its weights' digest and its cycle."""

    name: str
    version: int
    cycle: int
    model_sha256: str


@dataclass(frozen=True)
class VerifiedModel:
    """A model built by trainguard's installed code from a signed directory that verified, predicting as its signed
    `model.json` says: for its task and through its `model_forward` hook when it has one. `registered` is the
    registry version it was checked against (None when `mlflow.pyfunc` loaded it); `load_model` verified a copy in
    a temporary directory, gone once it returns (the weights are in memory)."""

    verification: ModelVerification
    module: Any
    task: str
    forward: Any
    registered: RegisteredVersion | None = None

    @property
    def python_model(self) -> VerifiedModel:
        """This model, so that `PyFuncModel.unwrap_python_model()` returns it."""
        return self

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Per input row (float32 features): a classifier's `label` (int64) and its `probability`; a multi-label
        model's `label_<i>` (0/1); a regression model's `output` (or `output_<i>`)."""
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


def parse_model_ref(model: str) -> ModelRef:
    """NAME (its champion), `models:/NAME@ALIAS` or `models:/NAME/VERSION`; anything else (paths, `runs:/`,
    logged-model ids) is refused: only a registry version has a recorded digest to check against."""
    if model and not set(model) & set("/:@") and model.strip() == model:
        return ModelRef(model, alias=CHAMPION)
    matched = _MODEL_REF.fullmatch(model)
    if matched is None:
        raise RegistryError(
            model, "model-ref", "not a registered model (NAME, models:/NAME@ALIAS or models:/NAME/VERSION)", exit_code=2
        )
    number = matched["version"]
    return ModelRef(matched["name"], alias=matched["alias"], version=int(number) if number else None)


def load_model(model: str, *, key: Path | str, attestation_key: Path | str | None = None) -> VerifiedModel:
    """Loads a registered model version (a bare name: its `champion`) verified against `key` (and
    `attestation_key`, default `key`) and against what the registry recorded; see the module docstring.

    Raises RegistryError (with its `reason`), ModelSignatureError or AttestationError before anything from the
    artifact store is used.

    Args:
        model: A registered model's name (its `champion`), `models:/NAME@ALIAS` or `models:/NAME/VERSION`.
        key: The model-signing public key (PEM) the caller pins; never one shipped with the artifacts.
        attestation_key: The key the attestation must be signed by (None: `key`).

    Returns:
        The model, built by trainguard's installed code from the verified files; `predict` serves it.

    Raises:
        RegistryError: Not a registered model reference, a version that is not registered (or not by trainguard),
            a champion alias behind a newer version, artifacts that cannot be downloaded, or weights or an attested
            cycle other than the ones the registry recorded.
        ModelSignatureError: The model's signature is missing, unreadable or does not match its files, or `key`
            cannot be read.
        AttestationError: The attestation or its key cannot be read, is malformed, is not signed by a trusted key,
            or names other files.

    Example::

        from trainguard import load_model

        model = load_model("digits-model", key="keys/model-signing.pub")  # the champion, verified
        predictions = model.predict(features)  # a DataFrame: `label` and `probability` per row
    """
    from mlflow.tracking import MlflowClient

    ref = parse_model_ref(model)
    client = MlflowClient()
    chosen = _version(client, ref)
    if ref.alias == CHAMPION:
        _check_newest(client, ref, chosen)
    with tempfile.TemporaryDirectory(prefix="trainguard-model-") as scratch:
        directory = _download(client, ref, chosen, Path(scratch))
        verification = verify_model(directory, None, Path(key), [Path(attestation_key or key)])
        _check_recorded(ref, chosen, verification)
        return _built(directory, verification, chosen)


def _version(client: Any, ref: ModelRef) -> RegisteredVersion:
    """The registry's record of the version `ref` names; a version trainguard did not register is refused."""
    from mlflow.exceptions import MlflowException

    try:
        found = (
            client.get_model_version_by_alias(ref.name, ref.alias)
            if ref.alias
            else client.get_model_version(ref.name, str(ref.version))
        )
    except MlflowException as error:
        raise RegistryError(ref.uri, "not-registered", " ".join(error.message.split())[:300], exit_code=2) from None
    recorded = _registered(found)
    if recorded is None:
        raise RegistryError(
            ref.uri, "not-trainguard", f"version {found.version} has no {MODEL_SHA256_TAG} and {CYCLE_TAG} tags"
        )
    return recorded


def _registered(found: Any) -> RegisteredVersion | None:
    """A registry ModelVersion as trainguard recorded it (None without its digest and cycle tags)."""
    digest, cycle = found.tags.get(MODEL_SHA256_TAG, ""), found.tags.get(CYCLE_TAG, "")
    if not re.fullmatch(r"[0-9a-f]{64}", digest) or not re.fullmatch(r"[0-9]{1,9}", cycle):
        return None
    return RegisteredVersion(found.name, int(found.version), int(cycle), digest)


def _check_newest(client: Any, ref: ModelRef, chosen: RegisteredVersion) -> None:
    """Refuses a champion alias behind a version trainguard registered later (by version number or cycle)."""
    quote = '"' if "'" in ref.name else "'"
    found, token = [], None
    while True:
        page = client.search_model_versions(f"name = {quote}{ref.name}{quote}", page_token=token)
        found += [v for v in map(_registered, page) if v is not None]
        token = page.token
        if not token:
            break
    ahead = [v for v in found if v.version > chosen.version or v.cycle > chosen.cycle]
    if ahead:
        newest = max(ahead, key=lambda v: (v.version, v.cycle))
        raise RegistryError(
            ref.uri,
            "champion-rollback",
            f"points to version {chosen.version} (cycle {chosen.cycle}), behind version {newest.version} "
            f"(cycle {newest.cycle}) that trainguard registered later; load models:/{ref.name}/{chosen.version} "
            "to use it on purpose",
        )


def _download(client: Any, ref: ModelRef, chosen: RegisteredVersion, scratch: Path) -> Path:
    """The version's signed model directory, copied as plain files into `scratch` (nothing else is fetched)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        location = client.get_model_version_download_uri(chosen.name, str(chosen.version))
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location.rstrip('/')}/{SIGNED_PATH}", dst_path=str(scratch / "download")
        )
    except (MlflowException, OSError) as error:
        detail = " ".join(str(error).split())[:300]
        raise RegistryError(ref.uri, "no-artifacts", f"cannot download {SIGNED_PATH}: {detail}") from None
    return scratch / "download" / SIGNED_MODEL


def _check_recorded(ref: ModelRef, chosen: RegisteredVersion, verification: ModelVerification) -> None:
    """The verified weights are the ones the registry recorded for the version, and the attestation's cycle is its
    cycle: an older signed model put in its place is refused."""
    if verification.model_sha256 != chosen.model_sha256:
        raise RegistryError(
            ref.uri,
            "digest-mismatch",
            f"the artifacts of version {chosen.version} hold weights sha256 {verification.model_sha256[:16]}..., "
            f"the registry recorded {chosen.model_sha256[:16]}...: another signed model was put in its place",
        )
    if verification.cycle is not None and verification.cycle != chosen.cycle:
        raise RegistryError(
            ref.uri,
            "cycle-mismatch",
            f"the attestation of version {chosen.version} is of cycle {verification.cycle}, the registry recorded "
            f"cycle {chosen.cycle}",
        )


def _built(
    directory: Path, verification: ModelVerification, registered: RegisteredVersion | None = None
) -> VerifiedModel:
    """The module named by the verified `model.json`, with the verified weights (read once, digest rechecked),
    its task and its `model_forward` hook (older models: a classifier called on its input)."""
    import importlib

    from safetensors.torch import load

    from trainguard.pipeline.config import Component

    data = (directory / MODEL_FILE).read_bytes()
    if hashlib.sha256(data).hexdigest() != verification.model_sha256:
        raise ModelSignatureError(f"{directory / MODEL_FILE}: changed after it was verified", path=str(directory))
    description = read_model_description(directory)
    use_verified_code(directory, verification.files)
    module = Component(class_path=description["class_path"], init_args=description["init_args"]).instantiate()
    module.load_state_dict(load(data))
    metadata = description.get("metadata") or {}
    hook = str(metadata.get("model_forward") or "")
    forward = None
    if hook:
        owner, _, name = hook.rpartition(".")
        forward = getattr(importlib.import_module(owner), name)
    return VerifiedModel(verification, module.eval(), str(metadata.get("task", "classification")), forward, registered)


def _load_pyfunc(data_path: str, model_config: Mapping[str, Any] | None = None) -> VerifiedModel:
    """MLflow's entry point (through `trainguard_mlflow_loader`, and the `loader_module` of versions logged before
    it): the signed model under `data_path`, verified with the caller's keys (model_config, then
    TRAINGUARD_MODEL_KEY), else with the ones bundled beside it."""
    data = Path(data_path)
    model_key, attestation_key = trusted_keys(data, model_config or {})
    directory = data / SIGNED_MODEL
    return _built(directory, verify_model(directory, None, model_key, [attestation_key]))


def trusted_keys(data: Path, model_config: Mapping[str, Any]) -> tuple[Path, Path]:
    """The model-signing and attestation public keys `mlflow.pyfunc` verifies against: the caller's (model_config,
    then TRAINGUARD_MODEL_KEY), else the ones bundled in the artifacts (which prove integrity, not origin)."""
    chosen = model_config.get("public_key") or os.environ.get(KEY_ENV)
    model_key = Path(chosen) if chosen else data / MODEL_KEY_FILE
    attestation = model_config.get("attestation_key") or chosen
    return model_key, Path(attestation) if attestation else data / ATTESTATION_KEY_FILE


def save_pyfunc(
    model_dir: Path, model_key: Path, attestation_key: Path, example: np.ndarray, destination: Path
) -> Path:
    """Writes the MLflow model for a signed model directory at `destination` (its input schema from `example`):
    the signed directory and the public keys as its data, this module as its loader with trainguard's code bundled,
    and requirements a package index resolves."""
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    from trainguard.pipeline import mlflow_loader

    description = read_model_description(model_dir)
    metadata = description.get("metadata") or {}
    task = metadata.get("task", "classification")
    output = (  # other tasks' output columns depend on the model's output width: their signature is the input's
        pd.DataFrame({"label": np.zeros(1, dtype=np.int64), "probability": np.zeros(1, dtype=np.float32)})
        if task == "classification"
        else None
    )
    model = find_model_code(model_imports(description.get("class_path"), metadata.get("model_forward")))
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        data = Path(scratch) / DATA
        shutil.copytree(model_dir, data / SIGNED_MODEL)
        shutil.copyfile(model_key, data / MODEL_KEY_FILE)
        shutil.copyfile(attestation_key, data / ATTESTATION_KEY_FILE)
        mlflow.pyfunc.save_model(
            path=str(destination),
            loader_module=mlflow_loader.MODULE,
            data_path=str(data),
            code_paths=[str(path) for path in _trainguard_code(Path(scratch) / "code")],
            model_config=dict.fromkeys(CONFIG_KEYS, ""),  # declared, so a loader may override them
            signature=infer_signature(np.asarray(example, dtype=np.float32), output),
            pip_requirements=serving_requirements(model.requirements),
        )
    return destination


def serving_requirements(model: Iterable[str] = ()) -> list[str]:
    """What serving needs installed (no inference subprocess): trainguard's own requirements (its code is bundled:
    trainguard is on no package index) and the model's installed packages, pinned to the versions here.

    Args:
        model: The model's own pinned requirements (`ModelCode.requirements`).

    Returns:
        Sorted `NAME==VERSION` requirements, none with a local version label.
    """
    from packaging.requirements import Requirement

    pins = {}
    for line in distribution_requires("trainguard") or []:
        needed = Requirement(line)
        if needed.marker is None or needed.marker.evaluate({"extra": ""}):
            pins[needed.name.lower()] = pinned(needed.name, needed.extras)
    for pin in model:
        pins.setdefault(pin.split("==")[0].lower(), pin)
    return sorted(pins.values())


def _trainguard_code(destination: Path) -> list[Path]:
    """The MLflow model's `code` paths: trainguard's modules zipped as they install (`trainguard/pipeline/...`,
    wherever each lies) and the loader that imports them where trainguard is not installed."""
    import zipfile

    from trainguard.pipeline import mlflow_loader

    sources = {name: path for package in _PACKAGES for name, path in module_sources(package).items()}
    destination.mkdir(parents=True)
    bundle = destination / mlflow_loader.BUNDLE
    with zipfile.ZipFile(bundle, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, path in sorted(sources.items()):
            archive.writestr(zipfile.ZipInfo(name), path.read_bytes(), zipfile.ZIP_DEFLATED)
    loader = destination / f"{mlflow_loader.MODULE}.py"
    shutil.copyfile(mlflow_loader.__file__, loader)
    return [bundle, loader]
