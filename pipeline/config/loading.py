"""Reading a cycle config: strict YAML from a regular file, schema validation, pydantic's errors translated into a
ConfigError naming the file and the key, then (optionally) the component checks."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from trainguard import strictyaml
from trainguard.files import read_regular
from trainguard.pipeline.config.components import check_config_components, use_project
from trainguard.pipeline.config.schema import CycleConfig
from trainguard.pipeline.errors import ConfigError

CONFIG_LIMIT = 4 * 1024 * 1024


def load_config(
    path: Path | str, *, check_components: bool = True, injected: Mapping[str, Sequence[str]] | None = None
) -> CycleConfig:
    """Reads and validates a cycle config; any problem raises ConfigError naming the file and the key.

    With `check_components`, the project folder goes on `sys.path`, every class_path is imported and its init_args
    bound to the constructor (`injected[section]` names arguments the cycle supplies itself).

    Args:
        path: The YAML config file.
        check_components: Whether class paths are imported and their `init_args` bound (False: the schema only,
            nothing imported and `sys.path` unchanged).
        injected: Section -> the constructor arguments the cycle supplies itself, left out of the binding.

    Returns:
        The validated config.

    Raises:
        ConfigError: The file cannot be read, is not YAML or is empty, a key is unknown, missing or invalid, the
            attack bounds do not cover the data's range, or a component cannot be imported or bound.

    Example::

        from trainguard import load_config, preflight

        config = load_config("configs/digits.yaml")
        for passed in preflight(config):
            print(passed.check, passed.detail)
    """
    path = Path(path)
    data = _read_yaml(path)
    config = parse_config(data, source=str(path))
    _check_bounds(config, str(path))
    if check_components:
        use_project(config, path)
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
