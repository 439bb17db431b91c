"""Checking a config's pluggable components: the project folder they import from, each class_path imported and
checked against its base class, each init_args bound to its constructor, before anything runs."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from trainguard.pipeline.config.binding import BindError, bound_init_args
from trainguard.pipeline.config.schema import TRAINER_SUPPLIED, Component, CycleConfig
from trainguard.pipeline.errors import ConfigError

# Which base class each pluggable component must derive from, and the constructor arguments the cycle injects.
_COMPONENT_BASES: dict[str, tuple[str, str] | None] = {
    "data": None,  # decoders and transforms: any class whose instances are callable
    "model": ("pytorch_lightning", "LightningModule"),
    "callbacks": ("pytorch_lightning", "Callback"),
    "trainer": ("pytorch_lightning", "Trainer"),
}
_SCREENING_CONFIG = "trainguard.defenses.roni.ScreeningConfig"
_DETECTOR_CONFIGS = {
    "spectral": "trainguard.defenses.spectral.SpectralConfig",
    "clustering": "trainguard.defenses.clustering.ClusteringConfig",
    "label_issues": "trainguard.defenses.label_issues.LabelIssuesConfig",
}


def project_dir(config: CycleConfig, path: Path) -> Path:
    """The folder the config's own modules import from: `project` (relative to the config file), else its folder."""
    return project_folder(config.project, path)


def project_folder(project: Path | str | None, path: Path) -> Path:
    """The folder a config file at `path` imports from, as its `project` value names it (None: the file's folder).

    Args:
        project: The config's `project`, relative to the config file.
        path: The config file.

    Returns:
        The folder, resolved.
    """
    folder = path.parent
    return (folder / project if project is not None else folder).resolve()


def use_project(config: CycleConfig, path: Path) -> Path:
    """Puts the config's project folder first on `sys.path` (once), so `class_path: mymodel.TabMLP` imports."""
    folder = project_dir(config, path)
    if not folder.is_dir():
        raise ConfigError(f"{path}: project: folder {folder} does not exist", key="project")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return folder


def check_config_components(
    config: CycleConfig,
    source: str = "<config>",
    injected: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Imports every pluggable class, checks its base class and binds its init_args to its signature."""
    named: list[tuple[str, str, Component]] = [("model", "model", config.model), ("trainer", "trainer", config.trainer)]
    named += [(f"callbacks[{i}]", "callbacks", c) for i, c in enumerate(config.callbacks)]
    named += [(f"data.decoders.{suffix}", "data", c) for suffix, c in config.data.decoders.items()]
    named += [(f"data.{k}", "data", c) for k in ("transform", "val_transform") if (c := getattr(config.data, k))]
    supplied = {"trainer": TRAINER_SUPPLIED} | dict(injected or {})
    for key, kind, component in named:
        _check_component(component, key, _COMPONENT_BASES[kind], tuple(supplied.get(kind, ())), source)
    if config.model_forward is not None:
        _check_function(config.model_forward, source)
    if config.roni.options:
        screening = Component(class_path=_SCREENING_CONFIG, init_args=config.roni.screening_options())
        try:
            screening_class = screening.resolve()
        except (ImportError, AttributeError) as error:
            raise ConfigError(f"{source}: roni.options: cannot check: {error}", key="roni.options") from None
        _bind_checked(screening_class, screening, "roni.options", ("num_classes",), source)
    for name, class_path in _DETECTOR_CONFIGS.items():
        options = Component(class_path=class_path, init_args=getattr(config.detectors, name))
        _bind_checked(options.resolve(), options, f"detectors.{name}", (), source)


def _check_component(
    component: Component, key: str, base: tuple[str, str] | None, injected: tuple[str, ...], source: str
) -> None:
    module_name, _, attr = component.class_path.rpartition(".")
    where = f"{source}: {key}.class_path"
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # an import runs arbitrary module code; any failure is the config's problem
        hint = ""
        if isinstance(error, ModuleNotFoundError) and error.name == module_name.split(".")[0]:
            hint = " (class paths import from the config's folder or its `project:` folder, then installed packages)"
        raise ConfigError(
            f"{where}: cannot import {module_name!r}: {type(error).__name__}: {error}{hint}", key=f"{key}.class_path"
        ) from None
    cls = getattr(module, attr, None)
    if not inspect.isclass(cls):
        raise ConfigError(f"{where}: {module_name!r} has no class {attr!r}", key=f"{key}.class_path")
    if base is None:
        if not any("__call__" in vars(klass) for klass in cls.__mro__[:-1]):
            raise ConfigError(f"{where}: {component.class_path} instances are not callable", key=f"{key}.class_path")
    elif not issubclass(cls, getattr(importlib.import_module(base[0]), base[1])):
        raise ConfigError(f"{where}: {component.class_path} is not a {base[0]}.{base[1]}", key=f"{key}.class_path")
    _bind_checked(cls, component, f"{key}.init_args", injected, source)


def _check_function(path: str, source: str) -> None:
    """`model_forward` imports (from the project, like class paths) and names a function."""
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # an import runs arbitrary module code; any failure is the config's problem
        hint = " (it imports like class paths, from the config's folder or its `project:` folder)"
        raise ConfigError(
            f"{source}: model_forward: cannot import {module_name!r}: {type(error).__name__}: {error}{hint}",
            key="model_forward",
        ) from None
    if not callable(getattr(module, attr, None)) or inspect.isclass(getattr(module, attr)):
        raise ConfigError(f"{source}: model_forward: {module_name!r} has no function {attr!r}", key="model_forward")


def _bind_checked(cls: type, component: Component, args_key: str, injected: tuple[str, ...], source: str) -> None:
    """Binds init_args to the constructor (jsonargparse), as a one-line ConfigError naming the argument."""
    clash = sorted(set(injected) & set(component.init_args))
    if clash:
        raise ConfigError(
            f"{source}: {args_key}.{clash[0]}: supplied by the cycle, remove it from the config",
            key=f"{args_key}.{clash[0]}",
        )
    try:
        bound_init_args(cls, component.init_args, skip=injected)
    except BindError as error:
        sub = f".{error.name}" if error.name else ""
        raise ConfigError(f"{source}: {args_key}{sub}: {error.message}", key=f"{args_key}{sub}") from None
