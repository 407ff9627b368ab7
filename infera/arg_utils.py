"""Settings dataclasses as command-line flags: a field declared with :func:`option` is its own flag.

A field ``max_num_seqs: int = option(256, help="most sequences running at once")`` becomes
``--max-num-seqs`` with ``type=int``, default 256 and that help; a bool field becomes
``--name/--no-name``.  Adding a setting is adding a field.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING
from typing import Any


def option(default: Any = MISSING, *, help: str, default_factory: Any = MISSING, flags: tuple[str, ...] = (),
           flag_default: Any = MISSING, **argparse_kwargs: Any) -> Any:
    """A dataclass field that is also a flag. ``flags``: its names (default ``--field-name``);
    ``flag_default``: the flag's default where it is not the field's (then something converts the
    parsed value); ``argparse_kwargs`` (choices, metavar, nargs, action, type) override what is
    derived from the field's type."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"help": help, "flags": flags, "default": flag_default,
                                       "argparse": argparse_kwargs})


def _flag_type(annotation: Any) -> Any:
    """``int | None`` -> int; a union of several types -> str (the dataclass parses the text)."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return annotation
    members = [t for t in typing.get_args(annotation) if t is not type(None)]
    return members[0] if len(members) == 1 else str


def _flag_default(f: dataclasses.Field) -> Any:
    if f.metadata["default"] is not MISSING:
        return f.metadata["default"]
    return f.default_factory() if f.default is MISSING else f.default


def add_dataclass_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """One flag per field of dataclass ``cls`` (each declared with :func:`option`), its dest the field's name."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"], "default": _flag_default(f)}
        kind = _flag_type(hints[f.name])
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float):
            kwargs["type"] = kind
        kwargs.update(f.metadata["argparse"])
        parser.add_argument(*(f.metadata["flags"] or ["--" + f.name.replace("_", "-")]), **kwargs)


def dataclass_kwargs(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The values of ``cls``'s flags in parsed ``args``, by field name."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
