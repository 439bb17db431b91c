"""Strict YAML for cycle configs and trust policies: one meaning per document, or a `StrictYAMLError`.

PyYAML's `safe_load` keeps the last of two equal keys in a mapping silently, so a second `enabled: false` decides
alone; here a repeated key is refused at its second occurrence, by name and line, as `strictjson` refuses it in
JSON. Otherwise the document is what `yaml.safe_load` reads.
"""

from __future__ import annotations

from typing import Any

import yaml


class StrictYAMLError(ValueError):
    """The text is not one unambiguous YAML document: `problem`, and `where` (" at line L, column C", or "")."""

    def __init__(self, problem: str, where: str = "") -> None:
        super().__init__(f"{problem}{where}")
        self.problem = problem
        self.where = where


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader whose mappings refuse a key they already hold."""


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: list[Any] = []
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.append(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def loads(data: bytes | str) -> Any:
    """The document in `data`, as `yaml.safe_load` reads it; raises StrictYAMLError on a repeated key or bad YAML."""
    try:
        return yaml.load(data, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise StrictYAMLError(getattr(error, "problem", None) or str(error).splitlines()[0], where) from None
    except (RecursionError, TypeError, ValueError, OverflowError) as error:
        raise StrictYAMLError(f"{type(error).__name__}: {error}") from None
