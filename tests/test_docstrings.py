"""The public API documents itself: every function and class in the `__all__` of `trainguard`, `trainguard.provenance`,
`trainguard.defenses` and `trainguard.pipeline` has a Google-style docstring whose `Args:` (or, for a dataclass or a
pydantic model, `Attributes:`) section names each parameter of its signature, and each top-level name shows an
`Example:`. Exceptions and constants need only their summary and are not walked.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
from collections.abc import Callable, Iterator

NAMESPACES = ("trainguard", "trainguard.provenance", "trainguard.defenses", "trainguard.pipeline")
_HEADER = re.compile(r"^(?P<indent> *)(?P<name>[A-Z][A-Za-z ]*):(?::)?\s*$")
_ENTRY = re.compile(r"^(?P<indent> +)(?P<name>\*{0,2}[A-Za-z_]\w*)(?: \([^)]*\))?:(?:\s|$)")
_SKIPPED = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _public_callables(namespace: str) -> Iterator[tuple[str, Callable[..., object]]]:
    """(qualified name, object) of each function and non-exception class a namespace exports (lazy names
    resolved through `getattr`, as a user's `from ... import` resolves them)."""
    module = importlib.import_module(namespace)
    for name in module.__all__:
        value = getattr(module, name)
        if inspect.isclass(value) and issubclass(value, BaseException):
            continue
        if inspect.isclass(value) or inspect.isfunction(value):
            yield f"{namespace}.{name}", value


def _sections(doc: str) -> dict[str, list[str]]:
    """The Google-style sections of a cleaned docstring: header (`Args`, `Raises`, `Example`...) -> its lines."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    indent = 0
    for line in doc.splitlines():
        header = _HEADER.match(line)
        if header is not None:
            current = sections.setdefault(header["name"], [])
            indent = len(header["indent"])
            continue
        if current is not None and line.strip() and len(line) - len(line.lstrip()) <= indent:
            current = None  # back at the header's indentation: the section ended
        if current is not None:
            current.append(line)
    return sections


def _documented(lines: list[str]) -> set[str]:
    """The names the first-level entries of an `Args:`/`Attributes:` section describe (`*`/`**` stripped)."""
    entries = [_ENTRY.match(line) for line in lines]
    indents = [len(m["indent"]) for m in entries if m is not None]
    return {m["name"].lstrip("*") for m in entries if m is not None and len(m["indent"]) == min(indents)}


def _parameters(value: Callable[..., object]) -> list[str]:
    """Parameter names of a function, or of a class's constructor (pydantic models: their fields), without self,
    *args and **kwargs."""
    return [p.name for p in inspect.signature(value).parameters.values() if p.kind not in _SKIPPED]


def _undocumented(value: Callable[..., object]) -> list[str]:
    """What the docstring of `value` lacks: the parameters its Args/Attributes sections do not name."""
    doc = inspect.getdoc(value) or ""
    sections = _sections(doc)
    named = _documented(sections.get("Args", []) + sections.get("Attributes", []))
    return [name for name in _parameters(value) if name not in named]


def test_every_public_callable_documents_each_argument() -> None:
    missing = {
        name: absent
        for namespace in NAMESPACES
        for name, value in _public_callables(namespace)
        if (absent := _undocumented(value))
    }
    lines = [f"{name}: Args/Attributes lacks {', '.join(absent)}" for name, absent in missing.items()]
    assert not missing, "\n".join(lines)


def test_args_sections_name_only_real_parameters() -> None:
    """An `Args:` entry for a parameter the signature no longer has is a stale docstring."""
    stale = {}
    for namespace in NAMESPACES:
        for name, value in _public_callables(namespace):
            signature = inspect.signature(value).parameters
            extra = _documented(_sections(inspect.getdoc(value) or "").get("Args", [])) - set(signature)
            if extra:
                stale[name] = sorted(extra)
    assert not stale, "\n".join(
        f"{name}: Args names {', '.join(names)}, not parameters" for name, names in stale.items()
    )


def test_every_top_level_callable_shows_an_example() -> None:
    without = [
        name
        for name, value in _public_callables("trainguard")
        if not {"Example", "Examples"} & set(_sections(inspect.getdoc(value) or ""))
    ]
    assert not without, f"no Example: section in {', '.join(without)}"


def test_top_level_examples_parse_and_import_what_exists() -> None:
    """An example a reader cannot run as far as its imports is wrong: each `Example:` block is valid Python, and
    every name it imports from trainguard exists where it imports it from."""
    broken = {}
    for name, value in _public_callables("trainguard"):
        sections = _sections(inspect.getdoc(value) or "")
        code = textwrap.dedent("\n".join(sections.get("Example", []) + sections.get("Examples", [])))
        try:
            tree = ast.parse(code)
        except SyntaxError as error:
            broken[name] = f"line {error.lineno}: {error.msg}"
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trainguard"):
                module = importlib.import_module(node.module or "")
                absent = [alias.name for alias in node.names if not hasattr(module, alias.name)]
                if absent:
                    broken[name] = f"{node.module} has no {', '.join(absent)}"
    assert not broken, "\n".join(f"{name}: {problem}" for name, problem in broken.items())


def test_the_walk_covers_each_namespace_and_skips_errors_and_constants() -> None:
    """The checks above are only as good as the walk: it resolves lazy names, finds functions and classes in every
    namespace but `trainguard.pipeline` (which exports its errors only) and leaves exceptions and constants out."""
    walked = {namespace: dict(_public_callables(namespace)) for namespace in NAMESPACES}
    assert "trainguard.verify_dataset" in walked["trainguard"]
    assert "trainguard.CycleConfig" in walked["trainguard"]
    assert "trainguard.provenance.Envelope" in walked["trainguard.provenance"]
    assert "trainguard.defenses.screen_candidates" in walked["trainguard.defenses"]
    assert walked["trainguard.pipeline"] == {}
    assert "trainguard.TrainguardError" not in walked["trainguard"]
    assert "trainguard.provenance.PAYLOAD_TYPE" not in walked["trainguard.provenance"]


def test_an_undocumented_argument_is_found() -> None:
    """The section parser sees an Args entry only at its first indentation, and a parameter without one is missing."""

    def documented(first: int, second: int, *rest: int, **options: int) -> None:
        """Adds.

        Args:
            first: The first; it may continue
                on an indented line that names no `second: here`.
            **options: Ignored.

        Returns:
            Nothing.
        """

    assert _undocumented(documented) == ["second"]
