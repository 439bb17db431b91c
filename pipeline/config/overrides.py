"""Dotted overrides of a cycle config from the command line (`--trainer.max_epochs=2`, `--roni.level=0.05`,
`--model.lr=0.01`), parsed by jsonargparse as LightningCLI parses them: each section's keys typed from the schema,
the Trainer's and the model's arguments from their constructors (`--trainer.callbacks+=...` appends a callback).
What they give is merged into the config as written, which the schema then validates as a whole."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from trainguard.pipeline.config.layout import lightning_layout
from trainguard.pipeline.config.schema import TRAINER_CLASS, CycleConfig
from trainguard.pipeline.errors import ConfigError

_COMPONENTS = ("trainer", "model", "callbacks")
"""Sections typed by the classes they name rather than by the schema: parsed with the config's values as the base."""
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (\S+)")
_KEYED = re.compile(r'Parser key "([^"]+)":\s*(.*)', re.S)
_NOT_ACCEPTED = re.compile(r"Problem with given class_path '([^']+)':\s*Option '([^']+)' is not accepted")
_CLASS_PROBLEM = re.compile(r"Problem with given class_path '([^']+)':\s*(.*?)(?:\s+- Expected a <class 'NoneType'>|$)")
_PYDANTIC = re.compile(r"validation error for \S+\s+(.*?)\s*\[type=")
_EXPECTED = re.compile(r"Expected a <class '([^']+)'>")
_GIVEN = re.compile(r"(?:Given|Got) value: (\S+)")
_NOT_NONE = re.compile(r"- Expected a <class 'NoneType'> Given value type: <class 'jsonargparse\._util\.NestedArg'>.*")
"""The alternative of a component section left unset (`model: null`), which any argument of it fails."""


def with_overrides(data: Any, overrides: Sequence[str], source: str) -> Any:
    """The config `data` (either layout) with `overrides` applied; nothing is imported but the config's Trainer,
    model and callback classes (their project folder must already be on `sys.path`).

    Args:
        data: The config as parsed from its YAML file.
        overrides: Command-line arguments, each `--section.key=value` or `--section.key value`.
        source: The config file, for error messages.

    Returns:
        The config in the schema's layout with the overrides merged in (`data` itself is left as it was).

    Raises:
        ConfigError: An override names no key of the schema or of the class it configures, or its value has the
            wrong type; one line naming the key.
    """
    if not overrides or not isinstance(data, dict):
        return data
    try:
        shaped = lightning_layout(data)
    except ValueError as error:
        key = str(error).partition(":")[0]
        raise ConfigError(f"{source}: {error}", key=key) from None
    parser = _parser()
    base = _component_base(shaped)
    try:
        namespace = parser.parse_object(base, defaults=False, _skip_validation=True)
        parsed = parser.parse_args(list(overrides), namespace=namespace, defaults=False, _skip_validation=True)
    except Exception as error:  # jsonargparse's ArgumentError, or an error a class_path's import raised
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        raise _override_error(error, overrides, source) from None
    given = parsed.as_dict()
    rest = {key: value for key, value in shaped.items() if key != "callbacks"}
    return lightning_layout(_merged(rest, given))


def _parser() -> Any:
    """The overrides' parser: the schema's sections, the Trainer's and the model's constructor arguments."""
    import pytorch_lightning as pl
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False, prog="trainguard")
    parser.add_class_arguments(CycleConfig, skip=set(_COMPONENTS), fail_untyped=False)
    parser.add_subclass_arguments(pl.Trainer, "trainer", required=False, fail_untyped=False)
    parser.add_subclass_arguments(pl.LightningModule, "model", required=False, fail_untyped=False)
    return parser


def _component_base(shaped: dict[str, Any]) -> dict[str, Any]:
    """The config's Trainer (its callbacks among its arguments, as LightningCLI keeps them) and model: what an
    override of one of their arguments is merged into and checked against."""
    trainer = shaped.get("trainer", {})
    init_args = trainer.get("init_args", {}) if isinstance(trainer, dict) else {}
    callbacks = shaped.get("callbacks", [])
    base: dict[str, Any] = {
        "trainer": {
            "class_path": trainer.get("class_path", TRAINER_CLASS) if isinstance(trainer, dict) else TRAINER_CLASS,
            "init_args": {**init_args, **({"callbacks": list(callbacks)} if callbacks else {})},
        }
    }
    if isinstance(shaped.get("model"), dict):
        base["model"] = shaped["model"]
    return base


def _merged(base: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """`base` with `given`'s values in, nested mappings key by key."""
    merged = dict(base)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def _override_error(error: Exception, overrides: Sequence[str], source: str) -> ConfigError:
    """jsonargparse's error as one line naming the dotted key at fault."""
    text = str(error)
    where = f"{source} {' '.join(overrides)}"
    unrecognized = _UNRECOGNIZED.search(text)
    if unrecognized:
        key = unrecognized.group(1).lstrip("-").partition("=")[0]
        return ConfigError(f"{where}: {key}: unknown key (not part of the schema)", key=key)
    keyed = _KEYED.search(text)
    section = keyed.group(1) if keyed else ""
    problem = " ".join((keyed.group(2) if keyed else text).split())
    not_accepted = _NOT_ACCEPTED.search(problem)
    if not_accepted:
        key = f"{section}.{not_accepted.group(2)}"
        return ConfigError(f"{where}: {key}: not an argument of {not_accepted.group(1)}", key=key)
    nested = _KEYED.search(problem)  # a class's own argument: `Parser key "max_epochs": ...` inside the section's
    if nested and section in _COMPONENTS:
        section, problem = f"{section}.{nested.group(1)}", " ".join(nested.group(2).split())
    else:
        in_class = _CLASS_PROBLEM.search(problem)
        problem = in_class.group(2) if in_class else problem
    pydantic = _PYDANTIC.search(problem)
    expected = list(dict.fromkeys(_EXPECTED.findall(_NOT_NONE.sub("", problem))))
    given = _GIVEN.search(problem)
    if pydantic:
        problem = pydantic.group(1)
    elif expected and given:  # jsonargparse's type check: the types a union tried, the value it was given
        problem = f"expected {' or '.join(expected).replace('NoneType', 'null')}, got {given.group(1)!r}"
    key = section or "<overrides>"
    return ConfigError(f"{where}: {key}: {problem}", key=key)
