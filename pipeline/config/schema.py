"""The pydantic schema of a cycle config: one model per section and `CycleConfig`, the whole config."""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainguard.pipeline.config.binding import bound_init_args
from trainguard.pipeline.config.layout import lightning_layout
from trainguard.pipeline.workdir import WorkDir
from trainguard.provenance.manifest import is_simple_name
from trainguard.provenance.manifest_ref import ManifestRef

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
"""MLflow 3's own default store: what `mlflow ui` opens, `trainguard load-model` reads and the cycle writes."""
_DOTTED = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$"

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[float, Field(gt=0.0)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def _refuse_set(self, keys: Sequence[str], where: str, why: str) -> None:
        """Refuses the first of `keys` the config wrote here: with the rest of the section it would reach nothing."""
        written = [key for key in keys if key in self.model_fields_set]
        if written:
            raise ValueError(f"{where}.{written[0]}: {why} (remove it)")


class Component(_Section):
    """A class named by import path and the keyword arguments its constructor takes, as LightningCLI writes them.

    The import runs with the config's project folder on `sys.path` (see `load_config`), and `init_args` are bound
    and type-checked against the constructor by jsonargparse (LightningCLI's parser): YAML's `1e-3` string becomes
    a float, a nested `class_path` becomes an instance."""

    class_path: Annotated[str, Field(pattern=_DOTTED)]
    init_args: dict[str, Any] = Field(default_factory=dict)

    def resolve(self) -> type:
        """Imports and returns the class (no checks: `load_config` has done them)."""
        module, _, name = self.class_path.rpartition(".")
        resolved: type = getattr(importlib.import_module(module), name)
        return resolved

    def instantiate(self, **injected: Any) -> Any:
        """A new instance built from `init_args` plus what the cycle supplies itself (e.g. a verified dataset)."""
        cls = self.resolve()
        return cls(**bound_init_args(cls, self.init_args, skip=tuple(injected)), **injected)


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

    def trust_of(self, ref: ManifestRef) -> Path:
        """The trust a manifest is verified against: its own, else the section's."""
        return ref.trust or self.trust

    @model_validator(mode="after")
    def _datasets_named(self) -> DatasetSection:
        """Each manifest names the dataset it must be, checked before anything else in it is believed: a validly
        signed manifest of another dataset copied over its path is refused."""
        named = [*((f"training.{i}", ref) for i, ref in enumerate(self.training)), ("holdout", self.holdout)]
        for where, ref in named:
            if ref.dataset is None:
                raise ValueError(f"dataset.{where}.dataset: required: the dataset its manifest must be")
            if not is_simple_name(ref.dataset):
                raise ValueError(
                    f"dataset.{where}.dataset: {ref.dataset!r} is not a dataset name (a letter or digit, then up to "
                    "127 of letters, digits and ._@:+-)"
                )
        return self

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, hint in _REMOVED_DATASET_KEYS.items():
                if key in data:
                    raise ValueError(f"{key} was removed: {hint}")
        return data


class TargetsSection(_Section):
    """Regression and multi-label targets, as validation checks them: the `shape` of one sample's target (`[]` one
    value, `[3]` three outputs or labels) and the closed range [`min`, `max`] every target value lies in (None:
    unbounded; multi-label targets are 0/1, so [0, 1])."""

    shape: tuple[Annotated[int, Field(ge=1)], ...] = ()
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> TargetsSection:
        finite = all(v is None or math.isfinite(v) for v in (self.min, self.max))
        if not finite or (self.min is not None and self.max is not None and self.min > self.max):
            raise ValueError(f"targets min {self.min} and max {self.max} must be finite with min <= max")
        return self


class ValidationSection(_Section):
    """Schema of a shard: for tables, which columns are features (default: all but the targets) and which hold the
    targets; for every format, the value range of inputs (table cells, pixels) and the shape of one decoded input.

    Targets: a classification task lists its class `labels` (integer targets, (N,)); a regression or multi-label
    task describes its targets in `targets` (shape and range; float targets stay float) and, for tables with more
    than one target, names them in `target_columns` (default: `label_column` alone), e.g.

        validation: {label_column: price, targets: {min: 0, max: 10}}                      # regression, one output
        validation: {target_columns: [cat, dog], targets: {shape: [2], min: 0, max: 1}}    # multilabel, two labels
    """

    feature_columns: tuple[str, ...] = ()
    feature_pattern: str | None = Field(default=None, description="fnmatch pattern, e.g. 'pixel_*'.")
    label_column: str = "label"
    target_columns: tuple[str, ...] = Field(
        default=(), description="Tables: the target columns of a regression or multi-label task (N, k) float."
    )
    feature_min: float = 0.0
    feature_max: float = 1.0
    input_shape: tuple[Annotated[int, Field(ge=1)], ...] | None = Field(
        default=None, description="Shape of one decoded input, e.g. [1, 8, 8]; None: any, the same in every shard."
    )
    labels: tuple[int, ...] = Field(default=(), description="Classification: the allowed class labels.")
    targets: TargetsSection | None = Field(default=None, description="Regression / multilabel: target shape, range.")
    min_rows: Annotated[int, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _consistent(self) -> ValidationSection:
        if self.feature_min >= self.feature_max:
            raise ValueError(f"feature_min {self.feature_min} must be below feature_max {self.feature_max}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels has duplicates")
        return self

    @property
    def table_targets(self) -> str | tuple[str, ...]:
        """Where a table's targets are: the label column, or the target columns when there are several."""
        return self.target_columns or self.label_column

    @property
    def target_names(self) -> tuple[str, ...]:
        """The table columns that are targets (never features)."""
        return self.target_columns or (self.label_column,)


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
    """Caps on one contributor's share of the accepted training shards (a flood of one source is refused), and on
    the decoded data the intake holds at once: training shards past it are refused by name (`intake-ceiling`); a
    trusted base or held-out set past it stops the cycle."""

    max_fraction_per_source: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    max_decoded_bytes: Annotated[int, Field(gt=0)] = 8 * 1024**3


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
    combination: Literal["brown", "simes", "fisher", "stouffer"] = "brown"
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
    per source, each calibrated on the held-out rows. `action`: reject every shard of a flagged source
    (`reject-source`, the default), drop only the flagged rows from training (`quarantine-rows`), or only `report`.
    `spectral`, `clustering` and `label_issues` are fields of SpectralConfig, ClusteringConfig and
    LabelIssuesConfig. On by default wherever they apply (a classification model read on its inputs alone): RONI
    alone misses thinly spread backdoors and a tenth of flipped shards (benchmarks/poisoning.py)."""

    enabled: bool | None = Field(
        default=None, description="None: on for classification without model_forward; true: required, else refused."
    )
    detectors: Annotated[tuple[Literal["spectral", "clustering", "label-issues"], ...], Field(min_length=1)] = (
        "spectral",
        "clustering",
        "label-issues",
    )
    action: Literal["quarantine-rows", "reject-source", "report"] = "reject-source"
    alpha: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        default=0.01, description="Budget of falsely flagged clean sources, shared by the detectors."
    )
    feature_layer: str | None = Field(default=None, description="Module whose input is the feature; None: last Linear.")
    spectral: dict[str, Any] = Field(default_factory=dict)
    clustering: dict[str, Any] = Field(default_factory=dict)
    label_issues: dict[str, Any] = Field(default_factory=dict)


class TaskSection(_Section):
    """The supervised task the defenses serve (`trainguard.defenses.task.Task`): the loss attacks maximise and what
    robust accuracy and the gate count as correct. `task: regression` is short for `task: {kind: regression}`.
    `tolerance` and `regression_loss` are a regression task's, `multilabel_accuracy` a multilabel task's: written
    for another kind they are refused."""

    kind: Literal["classification", "multilabel", "regression"] = "classification"
    tolerance: Positive = Field(default=0.5, description="Regression: an output within this of its target is right.")
    regression_loss: Literal["mse", "l1"] = "mse"
    multilabel_accuracy: Literal["exact", "per-label"] = "exact"

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"kind": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _options_of_the_kind(self) -> TaskSection:
        if self.kind != "regression":
            self._refuse_set(("tolerance", "regression_loss"), "task", f"a regression task's, not {self.kind}'s")
        if self.kind != "multilabel":
            self._refuse_set(("multilabel_accuracy",), "task", f"a multilabel task's, not {self.kind}'s")
        return self

    def build(self) -> Any:
        """The `trainguard.defenses.task.Task` this section describes."""
        from trainguard.defenses.task import Task

        return Task(**self.model_dump())


_NOT_TRADES = ("ratio", "warmup_epochs")
"""AdversarialTraining's knobs that TRADES has no counterpart for: it trains every row on both terms, at full eps."""


class AdversarialSection(_Section):
    """Adversarial training: `fgsm`, `pgd`, `fgsm-rs` run `trainguard.defenses.adversarial.AdversarialTraining`;
    `trades` trains the model inside `trainguard.defenses.trades.TRADES` (eps, steps, step_size, norm, bounds and
    `trades_beta`). A key the chosen attack has no use for is refused, not ignored: `ratio` and `warmup_epochs` with
    `trades`, `trades_beta` with the others, `steps` with `fgsm` and `fgsm-rs` (one step), `step_size` with `fgsm`."""

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

    @model_validator(mode="after")
    def _options_of_the_attack(self) -> AdversarialSection:
        if self.attack == "trades":
            self._refuse_set(_NOT_TRADES, "adversarial", "AdversarialTraining's; TRADES has none")
        else:
            self._refuse_set(("trades_beta",), "adversarial", f"only attack trades uses it, not {self.attack}")
        if self.attack == "fgsm":
            self._refuse_set(("steps", "step_size"), "adversarial", "FGSM takes one step of eps")
        if self.attack == "fgsm-rs":
            self._refuse_set(("steps",), "adversarial", "FGSM-RS takes one step (its step_size sets it)")
        return self


_RESTARTING = {"apgd-ce", "apgd-dlr", "apgd-t", "fab-t"}


class RobustEvalSection(_Section):
    """Robust accuracy (`trainguard.defenses.robust.RobustAccuracy`) at each eps on up to `subset_size` held-out
    rows: under PGD, under the per-sample worst case of several attacks (e.g. APGD-CE and APGD-DLR), or under a
    preset run as AutoAttack's cascade (`autoattack`: APGD-CE, APGD-T, FAB-T, Square; `autoattack-fast`: APGD-CE
    and APGD-T; with the gradient-masking check), which the gate's robust floor then applies to."""

    eps: Annotated[tuple[Annotated[float, Field(ge=0.0)], ...], Field(min_length=1)] = (0.0, 0.05, 0.1)
    subset_size: Annotated[int, Field(ge=1)] = 256
    steps: Annotated[int, Field(ge=1, description="None: 10, or AutoAttack's 100 for a preset.")] | None = None
    attacks: (
        Annotated[tuple[Literal["pgd", "apgd-ce", "apgd-dlr", "apgd-t"], ...], Field(min_length=1)]
        | Literal["autoattack", "autoattack-fast"]
    ) = ("pgd",)
    restarts: Annotated[int, Field(ge=1, description="APGD's and FAB-T's random restarts (refused without them).")] = 1

    def attack_names(self) -> tuple[str, ...]:
        """The attacks run, a preset's spelled out."""
        if isinstance(self.attacks, str):
            from trainguard.defenses.attacks.cascade import PRESETS

            return PRESETS[self.attacks]
        return self.attacks

    @model_validator(mode="after")
    def _distinct_attacks(self) -> RobustEvalSection:
        if not isinstance(self.attacks, str) and len(set(self.attacks)) != len(self.attacks):
            raise ValueError(f"attacks {list(self.attacks)} has duplicates")
        if not set(self.attack_names()) & _RESTARTING:
            self._refuse_set(("restarts",), "robust_eval", "only APGD and FAB-T restart; attacks has neither")
        return self


class GateSection(_Section):
    """What a candidate model must reach on the held-out set to replace the last accepted one."""

    min_clean_accuracy: Fraction = 0.8
    min_robust_accuracy: Fraction = 0.0
    robust_eps: Annotated[float, Field(ge=0.0)] | None = Field(
        default=None, description="One of robust_eval.eps; None: the largest."
    )
    max_accuracy_drop: Fraction = 0.02
    max_class_drop: Fraction = 0.1


_MOVED_TRAINING_KEYS = ("max_epochs", "accelerator", "devices", "strategy", "deterministic")


class TrainingSection(_Section):
    """What trainguard itself needs to train: batch size, seed, loader workers and the first cycle's epochs on the
    trusted base. Everything Lightning's Trainer takes goes in the `trainer:` block instead."""

    batch_size: Annotated[int, Field(ge=1)] = 64
    seed: int = 0
    num_workers: Annotated[int, Field(ge=0)] = 0
    bootstrap_epochs: Annotated[int, Field(ge=1, description="First cycle: epochs on the trusted data.")] = 5
    rank_timeout: Positive = Field(
        default=1800.0,
        description="Under DDP: seconds a rank waits for the others in a collective (Lightning's too) before the "
        "cycle stops on every rank, naming a rank that did not arrive; the wait for rank 0's plan is at least 12 h.",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in _MOVED_TRAINING_KEYS:
                if key in data:
                    raise ValueError(
                        f"{key} moved to the trainer block: trainer.{key} (LightningCLI's layout) or "
                        f"trainer.init_args.{key}"
                    )
        return data


TRAINER_CLASS = "pytorch_lightning.Trainer"
TRAINER_DEFAULTS: dict[str, Any] = {"max_epochs": 5, "deterministic": True}
TRAINER_SUPPLIED = ("callbacks", "logger", "enable_checkpointing", "enable_progress_bar", "enable_model_summary")
"""Trainer arguments the cycle sets itself: its defenses and yours as callbacks, its MLflow logger, no checkpoints
(it saves signed models), its own progress display."""


class TrainerSection(Component):
    """Lightning's Trainer: `init_args` are `Trainer` arguments (max_epochs, accelerator, devices, strategy,
    precision, ...); LightningCLI's flat `trainer:` block is read as them (`layout`). Unset, `max_epochs` is 5 and
    `deterministic` true; the arguments in TRAINER_SUPPLIED are the cycle's (`trainer.callbacks` are read as the
    config's `callbacks`, which the cycle runs after its defenses)."""

    class_path: Annotated[str, Field(pattern=_DOTTED)] = TRAINER_CLASS
    init_args: dict[str, Any] = Field(default_factory=lambda: dict(TRAINER_DEFAULTS))

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("init_args", {}), dict):
            return {**data, "init_args": TRAINER_DEFAULTS | data.get("init_args", {})}
        return data

    def arg(self, name: str, default: Any = None) -> Any:
        """One Trainer argument as configured, else `default` (Lightning's own default)."""
        return self.init_args.get(name, default)


class OutputSection(_Section):
    """Where the cycle writes (models, reports, read logs, its signed state) and the keys it signs with."""

    work_dir: Path
    model_signing_key: Path = Field(description="ECDSA P-256 (or P-384/P-521) private key, PEM.")
    attestation_key: Path | None = Field(default=None, description="DSSE signing key; default model_signing_key.")
    state_file: Path | None = Field(default=None, description="Cross-cycle state; default work_dir/state.json.")

    @property
    def state_path(self) -> Path:
        return self.state_file or self.paths.state

    @property
    def paths(self) -> WorkDir:
        """Every path the cycle builds under `work_dir`."""
        return WorkDir(self.work_dir)

    @property
    def attestation_key_path(self) -> Path:
        return self.attestation_key or self.model_signing_key


def resolve_tracking_uri(configured: str | None = None) -> str:
    """MLFLOW_TRACKING_URI wins, then the config's URI, then MLflow's own default store (`mlflow.db` here)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_TRACKING_URI


class TrackingSection(_Section):
    """The MLflow experiment and registered model the cycle logs to."""

    experiment_name: str = "trainguard"
    registered_model_name: str = "trainguard-model"
    uri: str | None = Field(default=None, description=f"Default {DEFAULT_TRACKING_URI}; MLFLOW_TRACKING_URI wins.")

    def resolved_uri(self) -> str:
        """MLFLOW_TRACKING_URI if set, else this config's `uri`, else MLflow's own default store."""
        return resolve_tracking_uri(self.uri)


class CycleConfig(_Section):
    """One retraining cycle: where the signed data is, how it is checked, how the model trains and is gated.

    `model`, `callbacks` and `trainer` are written as LightningCLI writes them (`class_path` + `init_args`); their
    class paths import with `project` (default: the config file's folder) on `sys.path`. LightningCLI's own layout
    is read too (`layout.lightning_layout`): a flat `trainer:` block, `trainer.callbacks`, and `data:` as the
    cycle's data module (`class_path: trainguard.provenance.VerifiedDataModule`, the section's keys as init_args).

    A model whose `forward` takes extra inputs (masks, lengths) gets them packed into its signed inputs after the
    features (extra channels or columns, so the same digest covers them and no format changes) and names a hook
    `model_forward: mymodule.masked_forward`, imported like a class path. The defenses call
    `hook(module, batch, x)`: `x` is the input they may perturb, `batch` the clean batch (`batch_input(batch)` gives
    its packed input), so the hook takes the features from `x` and the extra inputs from the clean batch; the
    served model calls it with the request's input as both.

    Built by `load_config` from a YAML file (unknown keys are refused); every section is frozen.

    Attributes:
        name: The pipeline's name (a letter or digit, then letters, digits, `_`, `.`, `-`).
        project: The folder the config's modules import from, relative to the config file (None: its folder).
        dataset: The signed training and held-out manifests (each naming its dataset) and the trust policy.
        validation: The shard schema: feature and target columns, value ranges, class labels or target shapes.
        data: Decoders for formats other than tables, and the per-sample transforms.
        limits: The cap on one source's share of the accepted training shards, and on decoded bytes held at once.
        task: The supervised task the defenses serve (classification, multilabel, regression).
        roni: RONI screening: on or off, level, error control, calibration draws, combination, ScreeningConfig
            options.
        detectors: The row-level poisoning detectors, their action and error budget.
        adversarial: Adversarial training: the attack (`fgsm`, `pgd`, `fgsm-rs`, `trades`) and its settings.
        robust_eval: Robust accuracy: the eps, held-out subset, attacks and restarts.
        gate: What a candidate model must reach on the held-out set to replace the last accepted one.
        training: Batch size, seed, loader workers, the first cycle's epochs on the trusted base, rank timeout.
        trainer: Lightning's Trainer as LightningCLI's `trainer:` block.
        model: The LightningModule (`class_path` and `init_args`).
        model_forward: Import path of `forward(module, batch, x)` for a model with extra inputs (see above).
        callbacks: More Lightning callbacks, as `class_path` and `init_args`.
        output: The work folder the cycle writes to, and its signing keys.
        tracking: The MLflow experiment, registered model name and tracking URI.

    Raises:
        pydantic.ValidationError: A value of the wrong type or out of range, an unknown or removed key, or
            sections that contradict each other (`load_config` turns it into a ConfigError naming the key).

    Example::

        from trainguard import load_config

        config = load_config("configs/digits.yaml")  # a CycleConfig, validated, its class paths importable
        print(config.roni.level, config.gate.max_accuracy_drop, config.output.work_dir)
    """

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    project: Path | None = Field(
        default=None, description="Folder your modules import from, relative to the config file; default its folder."
    )
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
    trainer: TrainerSection = TrainerSection()
    model: Component
    model_forward: Annotated[str, Field(pattern=_DOTTED)] | None = Field(
        default=None,
        description="Import path of `forward(module, batch, x)`, for a model with extra inputs (see the docstring).",
    )
    callbacks: tuple[Component, ...] = ()
    output: OutputSection
    tracking: TrackingSection = TrackingSection()

    @model_validator(mode="before")
    @classmethod
    def _lightning_layout(cls, data: Any) -> Any:
        return lightning_layout(data)

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "datamodule" in data:
            raise ValueError(
                "datamodule: the cycle trains through its own verified data module (signed, screened shards only) "
                "and never used this one; per-sample transforms go in data.transform (remove it)"
            )
        return data

    @model_validator(mode="after")
    def _robust_floor_is_measured(self) -> CycleConfig:
        eps = self.gate.robust_eps
        if eps is not None and eps not in self.robust_eval.eps:
            measured = ", ".join(f"{e:g}" for e in self.robust_eval.eps)
            raise ValueError(
                f"gate.robust_eps: {eps:g} is not among robust_eval.eps [{measured}], where robust accuracy is "
                "measured (the floor would reject every model)"
            )
        return self

    @model_validator(mode="after")
    def _targets_fit_task(self) -> CycleConfig:
        kind, section = self.task.kind, self.validation
        if kind == "classification":
            if len(section.labels) < 2:
                raise ValueError("validation.labels: a classification task lists two or more class labels")
            if section.targets is not None or section.target_columns:
                raise ValueError(
                    "validation.targets: a classification task's targets are its validation.labels; targets and "
                    "target_columns describe regression or multilabel targets (set task:)"
                )
            return self
        if section.labels:
            raise ValueError(
                f"validation.labels: a {kind} task has no class labels; describe its targets in validation.targets"
            )
        if section.targets is None:
            raise ValueError(f"validation.targets: a {kind} task needs its targets' shape and range (shape, min, max)")
        if kind == "multilabel" and len(section.targets.shape) != 1:
            raise ValueError("validation.targets.shape: multilabel targets are one 0/1 vector per sample, e.g. [5]")
        if section.target_columns and section.targets.shape != (len(section.target_columns),):
            raise ValueError(
                f"validation.targets.shape: {len(section.target_columns)} target_columns give targets of shape "
                f"[{len(section.target_columns)}], not {list(section.targets.shape)}"
            )
        return self

    @model_validator(mode="after")
    def _dlr_has_classes(self) -> CycleConfig:
        classes, names = len(self.validation.labels), self.robust_eval.attack_names()
        for name, least in (("apgd-dlr", 3), ("apgd-t", 4)):
            if name in names and self.task.kind != "classification":
                raise ValueError(f"robust_eval.attacks: {name} attacks class logits; task {self.task.kind} has none")
            if name in names and classes < least:
                raise ValueError(
                    f"robust_eval.attacks: {name} needs {least} or more classes, validation.labels has {classes}"
                )
        return self

    @model_validator(mode="after")
    def _detectors_classify(self) -> CycleConfig:
        if self.detectors.enabled and self.task.kind != "classification":
            raise ValueError(f"detectors group rows by class label; task {self.task.kind} has none (disable them)")
        if self.detectors.enabled and self.model_forward is not None:
            raise ValueError("detectors read the model on its inputs alone; disable them with model_forward")
        return self

    @property
    def detectors_on(self) -> bool:
        """Whether the cycle runs the row-level detectors: as the config says, else wherever they apply."""
        if self.detectors.enabled is not None:
            return self.detectors.enabled
        return self.task.kind == "classification" and self.model_forward is None

    def forward_hook(self) -> Any:
        """The `model_forward` hook (imported: `load_config` put the project on `sys.path`), else None."""
        if self.model_forward is None:
            return None
        module, _, name = self.model_forward.rpartition(".")
        return getattr(importlib.import_module(module), name)

    @property
    def pipeline_identity(self) -> tuple[str, str]:
        """What the cycle state is bound to: the config's name and its work folder as written (so a project moved
        or cloned whole stays the same pipeline)."""
        return (self.name, self.output.work_dir.as_posix())

    def resolved(self) -> dict[str, Any]:
        """The whole config with defaults filled in, as JSON-ready data (for params and the attestation)."""
        return self.model_dump(mode="json")
