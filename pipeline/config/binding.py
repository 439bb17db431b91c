"""Binding a component's `init_args` to its constructor with jsonargparse (LightningCLI's parser)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from typing import Any


class BindError(Exception):
    """init_args that do not bind to a constructor; `name` is the argument at fault ("" when none is)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message


_PARSER_KEY = re.compile(r'Parser key "init_args\.([^"]+)":\s*(.*)', re.S)
_UNKNOWN = re.compile(r"does not accept (?:option|nested key) '([^']+)'")


def bound_init_args(cls: type, init_args: Mapping[str, Any], skip: Sequence[str] = ()) -> dict[str, Any]:
    """`init_args` parsed against `cls`'s constructor by jsonargparse (as LightningCLI does): coerced to the
    annotations, defaults left to the class, nested `class_path` values instantiated. Raises BindError."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    try:
        parser.add_class_arguments(cls, "init_args", skip=set(skip), fail_untyped=False, instantiate=False)
    except Exception as error:  # a signature jsonargparse cannot read: the constructor checks its arguments itself
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        return dict(init_args)
    try:
        parsed = parser.instantiate(parser.parse_object({"init_args": dict(init_args)}))
    except Exception as error:  # jsonargparse raises ArgumentError, or the nested constructor's own error
        raise _bind_error(cls, error) from None
    values = getattr(parsed, "init_args", None)
    chosen = {name: getattr(values, name) for name in init_args} if values is not None else {}
    return {name: value.as_dict() if hasattr(value, "as_dict") else value for name, value in chosen.items()}


def _bind_error(cls: type, error: Exception) -> BindError:
    text = str(error)
    unknown = _UNKNOWN.search(text)
    if unknown:
        accepted = ", ".join(p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs"))
        return BindError(unknown.group(1), f"not an argument of {cls.__module__}.{cls.__qualname__} (takes {accepted})")
    keyed = _PARSER_KEY.search(text)
    if keyed:
        return BindError(keyed.group(1).split(".")[0], " ".join(keyed.group(2).split()))
    return BindError("", f"{cls.__qualname__}: " + " ".join(text.split()))
