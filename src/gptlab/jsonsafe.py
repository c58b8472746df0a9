"""JSON from untrusted places (a user's JSONL, a client's request body, a file that may be damaged), read one way.

``json.loads`` accepts what no JSON writer should produce and what later code cannot handle: NaN and
Infinity, numbers beyond a float, nesting deep enough to exhaust the stack, lone UTF-16 surrogates that
UTF-8 cannot encode. ``parse_json`` refuses each with a message for people (``BadJSON``).
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["BadJSON", "parse_json", "unencodable", "json_type"]


def json_type(value: Any) -> str:
    """How an error message names a JSON value's type ("a string", "a list", ...)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    names: dict[type, str] = {str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), "null")


class BadJSON(ValueError):
    """Why untrusted JSON was refused; ``field`` is where a bad string sits (``messages[0].content``), if one does."""

    def __init__(self, message: str, syntax: bool = False, field: str | None = None) -> None:
        super().__init__(message)
        self.syntax, self.field = syntax, field


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")  # json.loads accepts NaN/Infinity by default


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e400: a literal JSON allows, read as infinity
        raise ValueError(f"{text} is beyond the range of a float, not a number JSON allows")
    return number


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` for untrusted input: ``BadJSON`` (a message for people) on bad syntax, on NaN/Infinity
    (JSON has no such numbers, nor do 1e400's), on nesting too deep to walk, and on a string that is not valid Unicode (a lone
    UTF-16 surrogate such as ``"\\ud800"``, which JSON allows and UTF-8 cannot encode)."""
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise BadJSON("JSON nested too deeply to read") from None
    except ValueError as e:
        raise BadJSON(f"not valid JSON ({getattr(e, 'msg', e)})", syntax="JSON allows" not in str(e)) from None
    where = unencodable(value)
    if where is not None:
        raise BadJSON(f"{where} is not valid Unicode (a lone UTF-16 surrogate such as \\ud800)", field=where)
    return value


def unencodable(value: Any) -> str | None:
    """Where in a parsed JSON value (``messages[0].content``) the first string sits that UTF-8 cannot encode."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return f"field {path}" if path else "the value"
        elif isinstance(v, dict):
            for k, item in reversed(list(v.items())):
                stack += [(item, f"{path}.{k}" if path else str(k)), (k, f"a key of {path or 'the object'}")]
        elif isinstance(v, list):
            stack += [(item, f"{path}[{i}]") for i, item in reversed(list(enumerate(v)))]
    return None
