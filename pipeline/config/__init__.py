"""The typed schema of a retraining-cycle config (YAML), validated in full before anything runs.

Pluggable parts (the LightningModule, the Trainer, extra callbacks, decoders) are written as LightningCLI writes
them, `class_path` + `init_args`; `load_config` imports each class with the config's project folder on `sys.path`
and binds its `init_args` with jsonargparse (LightningCLI's parser), so a typo fails with the key that holds it,
never halfway through a cycle. Importing a `class_path` runs that module's code: a config is trusted input, like
the training code it names. Relative paths in the config are relative to the directory `trainguard` runs in (the
repository root under DVC).

The package, one concept a module: `schema` (the section models and `CycleConfig`), `loading` (`load_config`: YAML,
validation, error translation), `components` (importing and checking class paths), `binding` (init_args against a
constructor, with jsonargparse). Everything is importable from here.
"""

from trainguard.pipeline.config.binding import BindError, bound_init_args
from trainguard.pipeline.config.components import check_config_components, project_dir, use_project
from trainguard.pipeline.config.loading import CONFIG_LIMIT, load_config, parse_config
from trainguard.pipeline.config.schema import (
    DEFAULT_TRACKING_URI,
    TRAINER_CLASS,
    TRAINER_DEFAULTS,
    TRAINER_SUPPLIED,
    AdversarialSection,
    Component,
    CycleConfig,
    DataSection,
    DatasetSection,
    DetectorsSection,
    Fraction,
    GateSection,
    LimitsSection,
    OutputSection,
    Positive,
    RobustEvalSection,
    RoniSection,
    TargetsSection,
    TaskSection,
    TrackingSection,
    TrainerSection,
    TrainingSection,
    ValidationSection,
    resolve_tracking_uri,
)

__all__ = [
    "CONFIG_LIMIT",
    "DEFAULT_TRACKING_URI",
    "TRAINER_CLASS",
    "TRAINER_DEFAULTS",
    "TRAINER_SUPPLIED",
    "AdversarialSection",
    "BindError",
    "Component",
    "CycleConfig",
    "DataSection",
    "DatasetSection",
    "DetectorsSection",
    "Fraction",
    "GateSection",
    "LimitsSection",
    "OutputSection",
    "Positive",
    "RobustEvalSection",
    "RoniSection",
    "TargetsSection",
    "TaskSection",
    "TrackingSection",
    "TrainerSection",
    "TrainingSection",
    "ValidationSection",
    "bound_init_args",
    "check_config_components",
    "load_config",
    "parse_config",
    "project_dir",
    "resolve_tracking_uri",
    "use_project",
]
