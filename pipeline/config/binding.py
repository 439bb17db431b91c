"""Binding a component's `init_args` to its constructor with jsonargparse (LightningCLI's parser)."""

from __future__ import annotations

import inspect
import re
import sys
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


def _accepted(cls: type) -> list[str]:
    """The keyword names `cls` takes: its named parameters and the keys of a `**kwargs: Unpack[SomeTypedDict]`
    (annotations that do not resolve are left unexpanded)."""
    from typing import get_args

    try:
        signature = inspect.signature(cls, eval_str=True)
    except NameError:
        signature = inspect.signature(cls)
    names = []
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            typed = get_args(parameter.annotation)
            names += [key for hint in typed for key in getattr(hint, "__annotations__", {})]
        elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL and parameter.name != "self":
            names.append(parameter.name)
    return names


def _public_name(cls: type) -> str:
    """`cls`'s dotted name as users write it in a `class_path`: its package's, where that package re-exports it."""
    package = cls.__module__.rpartition(".")[0]
    if package and getattr(sys.modules.get(package), cls.__qualname__, None) is cls:
        return f"{package}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _bind_error(cls: type, error: Exception) -> BindError:
    text = str(error)
    unknown = _UNKNOWN.search(text)
    if unknown:
        accepted = ", ".join(_accepted(cls))
        return BindError(unknown.group(1), f"not an argument of {_public_name(cls)} (takes {accepted})")
    keyed = _PARSER_KEY.search(text)
    if keyed:
        return BindError(keyed.group(1).split(".")[0], " ".join(keyed.group(2).split()))
    return BindError("", f"{cls.__qualname__}: " + " ".join(text.split()))
