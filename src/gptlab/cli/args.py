"""Building blocks of the parser: flags generated from the configuration dataclasses, command groups.

Flags come from the config dataclasses, so a default and its meaning are written once.

Each field becomes ``--field-name`` with the field's type (``--flag/--no-flag``
for booleans, choices for a ``Literal``), the string literal under the field as
its help, and its default shown. Every flag defaults to None, "not given": the
run's own resolution (``train.config.resolve``) decides, so a flag overrides a
config file and a resumed run only when it is given.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing
from typing import Any, Callable, Literal, Mapping, Union

from ..config import Config, field_types

__all__ = ["field_docs", "add_fields", "given", "exit_code", "add_group", "Adder", "unescape"]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of ``cls`` and its bases (the field's documentation)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0]
        assert isinstance(body, ast.ClassDef)
        for node, after in zip(body.body, body.body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _scalar(hint: Any) -> Any:
    """``int`` of ``int | None``; the type itself otherwise."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return options[0] if len(options) == 1 else str
    return hint


def _dest(cls: type[Config], name: str) -> str:
    return f"{cls.section}.{name}"


def add_fields(parser: argparse.ArgumentParser, cls: type[Config], *, title: str, skip: tuple[str, ...] = (),
               rename: Mapping[str, str] | None = None, defaults: Mapping[str, str] | None = None) -> None:
    """One flag per field of ``cls`` in an argument group; ``defaults`` replaces the shown default of a field
    (a stage's own default, or how it is derived)."""
    group = parser.add_argument_group(title)
    hints, docs = field_types(cls), field_docs(cls)  # type: ignore[arg-type]  # a class is Hashable (mypy#11470)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        name = (rename or {}).get(f.name, f.name)
        doc = docs.get(f.name, f.name)
        shown = (defaults or {}).get(f.name)
        if shown is None and f.default is not None:
            shown = repr(f.default)
        help_text = (doc if shown is None and "(default" in doc else f"{doc} (default: {shown})").replace("%", "%%")
        kind = _scalar(hints[f.name])
        options: dict[str, Any] = {"dest": _dest(cls, f.name), "default": None, "help": help_text}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            options["choices"] = list(typing.get_args(kind))
        else:
            options.update(type=kind, metavar=kind.__name__.upper())
        group.add_argument(f"--{name.replace('_', '-')}", **options)


def given(args: argparse.Namespace, cls: type[Config]) -> dict[str, Any]:
    """The fields of ``cls`` set on the command line."""
    return {f.name: value for f in dataclasses.fields(cls)
            if (value := getattr(args, _dest(cls, f.name), None)) is not None}


def exit_code(signal: int | None) -> int:
    """A run stopped by a signal exits as the shell expects (128 + its number)."""
    return 128 + signal if signal else 0


Adder = Callable[[argparse._SubParsersAction], None]


def add_group(sub: argparse._SubParsersAction, name: str, help: str, children: list[Adder]) -> None:
    """A command with sub-commands of its own (``gptlab eval ppl``, ``gptlab tasks make``)."""
    group = sub.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", required=True)
    for add in children:
        add(group)


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """``\\n``, ``\\t``, ``\\r`` and ``\\\\`` typed in a shell argument as the characters they name."""
    return re.sub(r"\\([ntr\\])", lambda m: ESCAPES[m.group(1)], text)
