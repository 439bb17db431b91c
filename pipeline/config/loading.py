"""Reading a cycle config: strict YAML from a regular file, schema validation, pydantic's errors translated into a
ConfigError naming the file and the key, then (optionally) the component checks."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from trainguard import strictyaml
from trainguard.files import read_regular
from trainguard.pipeline.config.components import check_config_components, project_folder, use_project
from trainguard.pipeline.config.layout import lightning_layout
from trainguard.pipeline.config.overrides import with_overrides
from trainguard.pipeline.config.schema import CycleConfig
from trainguard.pipeline.errors import ConfigError

CONFIG_LIMIT = 4 * 1024 * 1024


def load_config(
    path: Path | str,
    *,
    check_components: bool = True,
    injected: Mapping[str, Sequence[str]] | None = None,
    overrides: Sequence[str] = (),
) -> CycleConfig:
    """Reads and validates a cycle config; any problem raises ConfigError naming the file and the key.

    With `check_components`, the project folder goes on `sys.path`, every class_path is imported and its init_args
    bound to the constructor (`injected[section]` names arguments the cycle supplies itself). `overrides` are
    LightningCLI's dotted command-line arguments (`--trainer.max_epochs=2`), merged in before validation.

    Args:
        path: The YAML config file.
        check_components: Whether class paths are imported and their `init_args` bound (False: the schema only,
            nothing imported and `sys.path` unchanged, unless `overrides` name the Trainer's or model's arguments).
        injected: Section -> the constructor arguments the cycle supplies itself, left out of the binding.
        overrides: Command-line overrides, each `--section.key=value` (`with_overrides`).

    Returns:
        The validated config.

    Raises:
        ConfigError: The file cannot be read, is not YAML or is empty, a key is unknown, missing or invalid, the
            attack bounds do not cover the data's range, a component cannot be imported or bound, or an override
            names no key or has the wrong type.

    Example::

        from trainguard import load_config, preflight

        config = load_config("configs/digits.yaml")
        for passed in preflight(config):
            print(passed.check, passed.detail)
    """
    path = Path(path)
    data = written = _read_yaml(path)
    source = str(path)
    if overrides:
        _import_from_project(data, path)
        data = with_overrides(data, overrides, source)
        source = f"{path} {' '.join(overrides)}"
    config = parse_config(data, source=source)
    _check_bounds(config, source)
    if check_components:
        use_project(config, path)
        try:
            check_config_components(config, source=source, injected=injected)
        except ConfigError as error:
            raise _as_written(error, written) from None
    return config


def _as_written(error: ConfigError, written: Any) -> ConfigError:
    """A Trainer argument's error named as the config wrote it: `trainer.max_epoch` in LightningCLI's flat layout,
    where the schema holds it as `trainer.init_args.max_epoch`."""
    trainer = written.get("trainer") if isinstance(written, dict) else None
    flat = isinstance(trainer, dict) and not {"class_path", "init_args"} & set(trainer)
    if not flat or error.key is None or not error.key.startswith("trainer.init_args."):
        return error
    key = error.key.replace("trainer.init_args.", "trainer.", 1)
    return ConfigError(str(error).replace(f": {error.key}", f": {key}", 1), key=key)


def _import_from_project(data: Any, path: Path) -> None:
    """Puts the folder the config's class paths import from on `sys.path` before it is validated, for the
    overrides' parser to import the model it configures (`use_project` checks the folder once it is)."""
    project = data.get("project") if isinstance(data, dict) else None
    folder = project_folder(project if isinstance(project, str) else None, path)
    if folder.is_dir() and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def parse_config(data: Any, source: str = "<config>") -> CycleConfig:
    """Validates already-parsed data against the schema (no imports)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping of sections, got {type(data).__name__}")
    try:
        return CycleConfig.model_validate(data)
    except ValidationError as error:
        raise _config_error(error, _as_validated(data), source) from None
    except (RecursionError, TypeError, ValueError) as error:
        raise ConfigError(f"{source}: cannot validate: {type(error).__name__}: {error}") from None


def _check_bounds(config: CycleConfig, source: str) -> None:
    """The attacks clamp to `adversarial.bounds` (robust accuracy too): they must cover the data's declared range,
    else every perturbed input is clipped into values the data never takes."""
    low, high = config.adversarial.bounds
    data_low, data_high = config.validation.feature_min, config.validation.feature_max
    if low > data_low or high < data_high:
        raise ConfigError(
            f"{source}: adversarial.bounds [{low:g}, {high:g}] do not cover the data's declared range "
            f"[{data_low:g}, {data_high:g}] (validation.feature_min/feature_max): set bounds to the data's range",
            key="adversarial.bounds",
        )


def _read_yaml(path: Path) -> Any:
    try:
        text = read_regular(path, limit=CONFIG_LIMIT).decode("utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: cannot read config: not UTF-8 ({error.reason})") from None
    try:
        data = strictyaml.loads(text)
    except strictyaml.StrictYAMLError as error:
        raise ConfigError(f"{path}: not valid YAML{error.where}: {error.problem}") from None
    if data is None:
        raise ConfigError(f"{path}: the config is empty")
    return data


def _as_validated(data: dict[str, Any]) -> Any:
    """The config in the schema's layout, as pydantic's error locations follow it (as written where it cannot be)."""
    try:
        return lightning_layout(data)
    except ValueError:
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


def _names_its_key(named: str, key: str, data: Any) -> bool:
    """Whether a validator's message starts with the key it is about: one inside the section that failed, or from
    the root a dotted key or a top-level key the config wrote."""
    if named.startswith(f"{key}."):
        return True
    return key == "<root>" and ("." in named or (isinstance(data, dict) and named in data))


def _config_error(error: ValidationError, data: Any, source: str) -> ConfigError:
    errors = error.errors(include_url=False, include_input=False)
    first = errors[0]
    key = _key_path(tuple(first["loc"]), data, first["type"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # a section's, a dataclass's
        message = "unknown key (not part of the schema)"
    named = re.match(r"([a-z_]+(?:\.(?:[a-z_]+|[0-9]+))*): ", message)
    if named and _names_its_key(named.group(1), key, data):  # a check across keys names its key first
        key, message = named.group(1), message[named.end() :]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ConfigError(f"{source}: {key}: {message}{more}", key=key)
