"""The typed schema of a retraining-cycle config (YAML), validated in full before anything runs.

Pluggable parts (the LightningModule, an optional LightningDataModule, extra callbacks) are named LightningCLI-style
by `class_path` + `init_args`; `load_config` imports each class and binds its `init_args` to the constructor's
signature, so a typo fails with the key that holds it, never halfway through a cycle. Importing a `class_path`
runs that module's code: a config is trusted input, like the training code it names.
Relative paths are relative to the directory `trainguard` runs in (the repository root under DVC).
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from trainguard.files import read_regular
from trainguard.pipeline.errors import ConfigError

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
CONFIG_LIMIT = 4 * 1024 * 1024
_DOTTED = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$"

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[float, Field(gt=0.0)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Component(_Section):
    """A class named by import path and the keyword arguments its constructor takes."""

    class_path: Annotated[str, Field(pattern=_DOTTED)]
    init_args: dict[str, Any] = Field(default_factory=dict)

    def resolve(self) -> type:
        """Imports and returns the class (no checks: `load_config` has done them)."""
        module, _, name = self.class_path.rpartition(".")
        return getattr(importlib.import_module(module), name)

    def instantiate(self, **injected: Any) -> Any:
        """A new instance built from `init_args` (coerced to the constructor's annotations, so YAML's `1e-3`
        string becomes a float) plus what the cycle supplies itself (e.g. a verified dataset)."""
        cls = self.resolve()
        return cls(**_coerced(cls, self.init_args), **injected)


class ManifestRef(_Section):
    """A signed data manifest, the dataset it must be, the directory its shards live in (default: the manifest's
    folder) and its trust. The dataset name is checked before anything else is believed: a validly signed manifest
    of another dataset copied over this path is refused."""

    manifest: Path
    dataset: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}$")]
    data_dir: Path | None = None
    trust: Path | None = Field(default=None, description="Policy or .pub for this manifest; default dataset.trust.")


_REMOVED_DATASET_KEYS = {
    "trusted_sources": "trust comes from keys: grant the role `trusted` to the curator's key set in the trust "
    "policy and sign the base shards with that role",
    "state_file": "anti-rollback records live in the cycle's signed state (output.state_file)",
}


class DatasetSection(_Section):
    """The signed manifests a cycle reads. What a shard may be used for (screened training data, trusted base,
    held-out set) comes from the key set that signed it, as the trust policy grants it."""

    training: Annotated[tuple[ManifestRef, ...], Field(min_length=1)]
    holdout: ManifestRef
    trust: Path = Field(description="Trust policy file (key sets and their grants) or a single .pub (train only).")
    allow_extra: bool = False

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, hint in _REMOVED_DATASET_KEYS.items():
                if key in data:
                    raise ValueError(f"{key} was removed: {hint}")
        return data


class ValidationSection(_Section):
    """Schema of a shard: for tables, which columns are features (default: all but the label); for every format,
    the value range of inputs (table cells, pixels), the shape of one decoded input, and the allowed labels."""

    feature_columns: tuple[str, ...] = ()
    feature_pattern: str | None = Field(default=None, description="fnmatch pattern, e.g. 'pixel_*'.")
    label_column: str = "label"
    feature_min: float = 0.0
    feature_max: float = 1.0
    input_shape: tuple[Annotated[int, Field(ge=1)], ...] | None = Field(
        default=None, description="Shape of one decoded input, e.g. [1, 8, 8]; None: any, the same in every shard."
    )
    labels: Annotated[tuple[int, ...], Field(min_length=2)]
    min_rows: Annotated[int, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _consistent(self) -> ValidationSection:
        if self.feature_min >= self.feature_max:
            raise ValueError(f"feature_min {self.feature_min} must be below feature_max {self.feature_max}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels has duplicates")
        return self


class DataSection(_Section):
    """How shards that are not tables decode, and the per-sample transforms training applies. Tables (parquet,
    2-D npy) need nothing here: they read through `validation`'s feature and label columns."""

    decoders: dict[Annotated[str, Field(pattern=r"^\.[A-Za-z0-9.]+$")], Component] = Field(
        default_factory=dict,
        description="Suffix (.tar, .npz, ...) -> a decoder class, its instance called as decode(name, data).",
    )
    transform: Component | None = Field(default=None, description="Per-sample callable for training inputs.")
    val_transform: Component | None = Field(default=None, description="Per-sample callable for held-out inputs.")


class LimitsSection(_Section):
    max_fraction_per_source: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5


_ERROR_RATE_KEYS = ("level", "error_control", "calibration_draws", "combination")


class RoniSection(_Section):
    """RONI screening of new shards, per shard and per source. `level` is the false-rejection rate: with
    `error_control` "per-candidate" the probability that a clean shard is rejected, with "bh" / "by" the false
    discovery rate across the cycle's tests. `calibration_draws` clean draws per candidate size give the p-values
    (at least 4 / level - 1); `combination` merges a source's shard p-values across shards and cycles. `options` are
    the other `trainguard.defenses.roni.ScreeningConfig` fields (steps, lr, ...), checked against that signature."""

    enabled: bool = True
    level: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.01
    error_control: Literal["per-candidate", "bh", "by"] = "per-candidate"
    calibration_draws: Annotated[int, Field(ge=1)] = 500
    combination: Literal["fisher", "stouffer"] = "fisher"
    calibration_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        default=0.4,
        description="Share of the held-out rows the clean-impact calibration draws from; RONI measures impacts on "
        "the rest. Both are never trained on, so clean candidates and calibration shards are alike to the model.",
    )
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_place_per_knob(self) -> RoniSection:
        both = sorted(set(self.options) & set(_ERROR_RATE_KEYS))
        if both:
            raise ValueError(f"options.{both[0]} is a key of the roni section itself; set it there")
        if self.calibration_draws + 1 < 4 / self.level:
            raise ValueError(
                f"calibration_draws {self.calibration_draws} cannot reach p <= level/4 (the smallest p-value is "
                f"1/(draws+1)); use at least {math.ceil(4 / self.level) - 1}"
            )
        return self

    def screening_options(self) -> dict[str, Any]:
        """The ScreeningConfig keyword arguments: `options` plus the error-rate knobs."""
        return {**self.options, **{key: getattr(self, key) for key in _ERROR_RATE_KEYS}}


class DetectorsSection(_Section):
    """Row-level poisoning detectors (`trainguard.defenses.detectors`) on the incoming model's penultimate features,
    per source, each calibrated on the held-out rows. `action`: drop the flagged rows from training
    (`quarantine-rows`), reject every shard of a flagged source (`reject-source`), or only `report`. `spectral`,
    `clustering` and `label_issues` are fields of SpectralConfig, ClusteringConfig and LabelIssuesConfig."""

    enabled: bool = False
    detectors: Annotated[tuple[Literal["spectral", "clustering", "label-issues"], ...], Field(min_length=1)] = (
        "spectral",
        "clustering",
        "label-issues",
    )
    action: Literal["quarantine-rows", "reject-source", "report"] = "quarantine-rows"
    alpha: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        default=0.01, description="Budget of falsely flagged clean sources, shared by the detectors."
    )
    feature_layer: str | None = Field(default=None, description="Module whose input is the feature; None: last Linear.")
    spectral: dict[str, Any] = Field(default_factory=dict)
    clustering: dict[str, Any] = Field(default_factory=dict)
    label_issues: dict[str, Any] = Field(default_factory=dict)


class TaskSection(_Section):
    """The supervised task the defenses serve (`trainguard.defenses.task.Task`): the loss attacks maximise and what
    robust accuracy and the gate count as correct. `task: regression` is short for `task: {kind: regression}`."""

    kind: Literal["classification", "multilabel", "regression"] = "classification"
    tolerance: Positive = Field(default=0.5, description="Regression: an output within this of its target is right.")
    regression_loss: Literal["mse", "l1"] = "mse"
    multilabel_accuracy: Literal["exact", "per-label"] = "exact"

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"kind": data} if isinstance(data, str) else data


class AdversarialSection(_Section):
    """Adversarial training (`trainguard.defenses.adversarial.AdversarialTraining`, or the TRADES module with
    `trades`)."""

    enabled: bool = True
    attack: Literal["fgsm", "pgd", "fgsm-rs", "trades"] = "pgd"
    eps: Positive = 0.1
    steps: Annotated[int, Field(ge=1)] = 5
    step_size: Positive | None = Field(default=None, description="None: 2.5 * eps / steps.")
    norm: Literal["inf", "2"] = "inf"
    ratio: Fraction = 0.5
    bounds: tuple[float, float] = (0.0, 1.0)
    warmup_epochs: Annotated[float, Field(ge=0.0)] = 0.0
    trades_beta: Positive = 6.0

    @model_validator(mode="after")
    def _bounds_ordered(self) -> AdversarialSection:
        if self.bounds[0] >= self.bounds[1]:
            raise ValueError(f"bounds {list(self.bounds)} must be [low, high] with low < high")
        return self


class RobustEvalSection(_Section):
    """Robust accuracy (`trainguard.defenses.robust.RobustAccuracy`) at each eps on up to `subset_size` held-out
    rows: under PGD, or under the per-sample worst case of several attacks (APGD-CE and APGD-DLR, the core of
    AutoAttack), which the gate's robust floor then applies to."""

    eps: Annotated[tuple[Annotated[float, Field(ge=0.0)], ...], Field(min_length=1)] = (0.0, 0.05, 0.1)
    subset_size: Annotated[int, Field(ge=1)] = 256
    steps: Annotated[int, Field(ge=1)] = 10
    attacks: Annotated[tuple[Literal["pgd", "apgd-ce", "apgd-dlr"], ...], Field(min_length=1)] = ("pgd",)
    restarts: Annotated[int, Field(ge=1, description="APGD's random restarts per sample.")] = 1

    @model_validator(mode="after")
    def _distinct_attacks(self) -> RobustEvalSection:
        if len(set(self.attacks)) != len(self.attacks):
            raise ValueError(f"attacks {list(self.attacks)} has duplicates")
        return self


class GateSection(_Section):
    """What a candidate model must reach on the held-out set to replace the last accepted one."""

    min_clean_accuracy: Fraction = 0.8
    min_robust_accuracy: Fraction = 0.0
    robust_eps: Annotated[float, Field(ge=0.0)] | None = Field(default=None, description="None: largest eval eps.")
    max_accuracy_drop: Fraction = 0.02
    max_class_drop: Fraction = 0.1


class TrainingSection(_Section):
    max_epochs: Annotated[int, Field(ge=1)] = 5
    batch_size: Annotated[int, Field(ge=1)] = 64
    seed: int = 0
    accelerator: str = "cpu"
    devices: Annotated[int, Field(ge=1)] | Literal["auto"] | list[Annotated[int, Field(ge=0)]] = 1
    strategy: str = "auto"
    deterministic: bool = True
    num_workers: Annotated[int, Field(ge=0)] = 0
    bootstrap_epochs: Annotated[int, Field(ge=1, description="First cycle: epochs on the trusted data.")] = 5


class OutputSection(_Section):
    work_dir: Path
    model_signing_key: Path = Field(description="ECDSA P-256 (or P-384/P-521) private key, PEM.")
    attestation_key: Path | None = Field(default=None, description="DSSE signing key; default model_signing_key.")
    state_file: Path | None = Field(default=None, description="Cross-cycle state; default work_dir/state.json.")

    @property
    def state_path(self) -> Path:
        return self.state_file or self.work_dir / "state.json"

    @property
    def attestation_key_path(self) -> Path:
        return self.attestation_key or self.model_signing_key


class TrackingSection(_Section):
    experiment_name: str = "trainguard"
    registered_model_name: str = "trainguard-model"
    uri: str | None = Field(default=None, description=f"Default {DEFAULT_TRACKING_URI}; MLFLOW_TRACKING_URI wins.")

    def resolved_uri(self) -> str:
        """MLFLOW_TRACKING_URI if set, else this config's `uri`, else the local sqlite default."""
        return os.environ.get("MLFLOW_TRACKING_URI") or self.uri or DEFAULT_TRACKING_URI


class CycleConfig(_Section):
    """One retraining cycle: where the signed data is, how it is checked, how the model trains and is gated."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    dataset: DatasetSection
    validation: ValidationSection
    data: DataSection = DataSection()
    limits: LimitsSection = LimitsSection()
    task: TaskSection = TaskSection()
    roni: RoniSection = RoniSection()
    detectors: DetectorsSection = DetectorsSection()
    adversarial: AdversarialSection = AdversarialSection()
    robust_eval: RobustEvalSection = RobustEvalSection()
    gate: GateSection = GateSection()
    training: TrainingSection = TrainingSection()
    model: Component
    datamodule: Component | None = None
    callbacks: tuple[Component, ...] = ()
    output: OutputSection
    tracking: TrackingSection = TrackingSection()

    @model_validator(mode="after")
    def _dlr_has_classes(self) -> CycleConfig:
        classes = len(self.validation.labels)
        if "apgd-dlr" in self.robust_eval.attacks and classes < 3:
            raise ValueError(f"robust_eval.attacks: apgd-dlr needs 3 or more classes, validation.labels has {classes}")
        return self

    @model_validator(mode="after")
    def _detectors_classify(self) -> CycleConfig:
        if self.detectors.enabled and self.task.kind != "classification":
            raise ValueError(f"detectors group rows by class label; task {self.task.kind} has none (disable them)")
        return self

    def resolved(self) -> dict[str, Any]:
        """The whole config with defaults filled in, as JSON-ready data (for params and the attestation)."""
        return self.model_dump(mode="json")


# Which base class each pluggable component must derive from, and the constructor arguments the cycle injects.
_COMPONENT_BASES: dict[str, tuple[str, str] | None] = {
    "data": None,  # decoders and transforms: any class whose instances are callable
    "model": ("pytorch_lightning", "LightningModule"),
    "datamodule": ("pytorch_lightning", "LightningDataModule"),
    "callbacks": ("pytorch_lightning", "Callback"),
}
_SCREENING_CONFIG = "trainguard.defenses.roni.ScreeningConfig"
_DETECTOR_CONFIGS = {
    "spectral": "trainguard.defenses.spectral.SpectralConfig",
    "clustering": "trainguard.defenses.clustering.ClusteringConfig",
    "label_issues": "trainguard.defenses.label_issues.LabelIssuesConfig",
}


def load_config(
    path: Path | str, *, check_components: bool = True, injected: Mapping[str, Sequence[str]] | None = None
) -> CycleConfig:
    """Reads and validates a cycle config; any problem raises ConfigError naming the file and the key.

    With `check_components`, every class_path is imported and its init_args bound to the constructor
    (`injected[section]` names arguments the cycle supplies itself, e.g. a datamodule's manifest).
    """
    path = Path(path)
    data = _read_yaml(path)
    config = parse_config(data, source=str(path))
    if check_components:
        check_config_components(config, source=str(path), injected=injected)
    return config


def parse_config(data: Any, source: str = "<config>") -> CycleConfig:
    """Validates already-parsed data against the schema (no imports)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping of sections, got {type(data).__name__}")
    try:
        return CycleConfig.model_validate(data)
    except ValidationError as error:
        raise _config_error(error, data, source) from None
    except (RecursionError, TypeError, ValueError) as error:
        raise ConfigError(f"{source}: cannot validate: {type(error).__name__}: {error}") from None


def check_config_components(
    config: CycleConfig,
    source: str = "<config>",
    injected: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Imports every pluggable class, checks its base class and binds its init_args to its signature."""
    named: list[tuple[str, str, Component]] = [("model", "model", config.model)]
    if config.datamodule is not None:
        named.append(("datamodule", "datamodule", config.datamodule))
    named += [(f"callbacks[{i}]", "callbacks", c) for i, c in enumerate(config.callbacks)]
    named += [(f"data.decoders.{suffix}", "data", c) for suffix, c in config.data.decoders.items()]
    named += [(f"data.{k}", "data", c) for k in ("transform", "val_transform") if (c := getattr(config.data, k))]
    for key, kind, component in named:
        supplied = tuple((injected or {}).get(kind, ()))
        _check_component(component, key, _COMPONENT_BASES[kind], supplied, source)
    if config.roni.options:
        screening = Component(class_path=_SCREENING_CONFIG, init_args=config.roni.screening_options())
        try:
            screening_class = screening.resolve()
        except (ImportError, AttributeError) as error:
            raise ConfigError(f"{source}: roni.options: cannot check: {error}", key="roni.options") from None
        _bind_init_args(screening_class, screening, "roni.options", (), source)
    for name, class_path in _DETECTOR_CONFIGS.items():
        options = Component(class_path=class_path, init_args=getattr(config.detectors, name))
        _bind_init_args(options.resolve(), options, f"detectors.{name}", (), source)


def _read_yaml(path: Path) -> Any:
    try:
        text = read_regular(path, limit=CONFIG_LIMIT).decode("utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: cannot read config: not UTF-8 ({error.reason})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from None
    except (RecursionError, ValueError, TypeError, OverflowError) as error:
        raise ConfigError(f"{path}: not valid YAML: {type(error).__name__}: {error}") from None
    if data is None:
        raise ConfigError(f"{path}: the config is empty")
    return data


def _key_path(loc: tuple[int | str, ...], data: Any, error_type: str) -> str:
    """The error's location as a dotted key path into what the user wrote (drops pydantic's union-member tags)."""
    parts: list[str] = []
    node = data
    for index, segment in enumerate(loc):
        in_dict = isinstance(node, dict) and segment in node
        in_list = isinstance(node, list) and isinstance(segment, int) and 0 <= segment < len(node)
        if in_dict or in_list:
            node = node[segment]
        elif not (error_type == "missing" and index == len(loc) - 1):
            break
        parts.append(f"[{segment}]" if isinstance(segment, int) else f".{segment}")
    return "".join(parts).lstrip(".") or "<root>"


def _config_error(error: ValidationError, data: Any, source: str) -> ConfigError:
    errors = error.errors(include_url=False, include_input=False)
    first = errors[0]
    key = _key_path(tuple(first["loc"]), data, first["type"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key (not part of the schema)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ConfigError(f"{source}: {key}: {message}{more}", key=key)


def _check_component(
    component: Component, key: str, base: tuple[str, str] | None, injected: tuple[str, ...], source: str
) -> None:
    module_name, _, attr = component.class_path.rpartition(".")
    where = f"{source}: {key}.class_path"
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # an import runs arbitrary module code; any failure is the config's problem
        raise ConfigError(
            f"{where}: cannot import {module_name!r}: {type(error).__name__}: {error}", key=f"{key}.class_path"
        ) from None
    cls = getattr(module, attr, None)
    if not inspect.isclass(cls):
        raise ConfigError(f"{where}: {module_name!r} has no class {attr!r}", key=f"{key}.class_path")
    if base is None:
        if not any("__call__" in vars(klass) for klass in cls.__mro__[:-1]):
            raise ConfigError(f"{where}: {component.class_path} instances are not callable", key=f"{key}.class_path")
    elif not issubclass(cls, getattr(importlib.import_module(base[0]), base[1])):
        raise ConfigError(f"{where}: {component.class_path} is not a {base[0]}.{base[1]}", key=f"{key}.class_path")
    _bind_init_args(cls, component, f"{key}.init_args", injected, source)


def _bind_init_args(cls: type, component: Component, args_key: str, injected: tuple[str, ...], source: str) -> None:
    """Binds init_args (plus injected names) to the constructor, then checks each value against its annotation."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return

    def error(sub: str, message: str) -> ConfigError:
        return ConfigError(f"{source}: {args_key}{sub}: {message}", key=f"{args_key}{sub}")

    clash = sorted(set(injected) & set(component.init_args))
    if clash:
        raise error(f".{clash[0]}", "supplied by the cycle, remove it from the config")
    try:
        signature.bind(**component.init_args, **dict.fromkeys(injected))
    except TypeError as problem:
        unknown = sorted(set(component.init_args) - set(signature.parameters))
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        sub = f".{unknown[0]}" if unknown and not accepts_any else ""
        raise error(sub, f"{problem} for {component.class_path}") from None
    try:
        _coerced(cls, component.init_args)
    except _BadArgument as bad:
        raise error(f".{bad.name}", bad.message) from None


class _BadArgument(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message


def _coerced(cls: type, init_args: Mapping[str, Any]) -> dict[str, Any]:
    """init_args validated against the constructor's annotations; raises _BadArgument on the first misfit."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations (forward refs to unimported names) are not checked
        hints = {}
    coerced = dict(init_args)
    for name, value in init_args.items():
        if name not in hints:
            continue
        try:
            adapter = TypeAdapter(hints[name])
        except Exception:  # a hint pydantic cannot build a validator for is left to the constructor
            continue
        try:
            coerced[name] = adapter.validate_python(value)
        except ValidationError as error:
            raise _BadArgument(name, error.errors(include_url=False)[0]["msg"]) from None
    return coerced
