"""Strict JSON for signed and security-relevant documents: one meaning per document, or a `StrictJSONError`.

Python's `json` accepts duplicate keys (last wins), NaN and Infinity, numbers that overflow to infinity and a
leading BOM; two parsers can then read the same signed bytes differently. All of these are refused here.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64


class StrictJSONError(ValueError):
    """The bytes are not one unambiguous JSON document."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise StrictJSONError(f"duplicate key {key!r}")
            seen.add(key)
    return document


def _constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJSONError(f"number {text[:40]} overflows")
    return value


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > 30:
        raise StrictJSONError(f"integer {text[:40]}... is too long")
    return int(text)


def _depth(document: dict[str, Any] | list[Any]) -> None:
    """Refuses nesting deeper than MAX_DEPTH, a level at a time (containers only: a manifest's leaves far outnumber
    them, and one comprehension per level costs less than a call per container)."""
    level: list[Any] = [document]
    for _ in range(MAX_DEPTH + 1):
        level = [
            child
            for value in level
            for child in (value.values() if isinstance(value, dict) else value)
            if isinstance(child, dict | list)
        ]
        if not level:
            return
    raise StrictJSONError(f"nested deeper than {MAX_DEPTH} levels")


def loads(data: bytes | str) -> Any:
    """The document in `data` (UTF-8, no BOM); raises StrictJSONError on anything ambiguous or malformed."""
    if isinstance(data, bytes):
        if data.startswith(b"\xef\xbb\xbf"):
            raise StrictJSONError("starts with a byte-order mark")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise StrictJSONError(f"not UTF-8 ({error.reason} at byte {error.start})") from None
    else:
        text = data
        if text.startswith("\ufeff"):
            raise StrictJSONError("starts with a byte-order mark")
    try:
        document = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_constant,
            parse_float=_finite,
            parse_int=_integer,
        )
    except StrictJSONError:
        raise
    except (ValueError, RecursionError) as error:
        raise StrictJSONError(str(error)) from None
    if isinstance(document, dict | list):
        _depth(document)
    return document
