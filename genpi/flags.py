"""Command-line flags from settings dataclasses: a setting's default and help text are written once, on its field.

    samples: int = setting(1000, "dialogues per prompt")
    ...
    add_settings(parser, SynthSettings)           # --samples (type int, default 1000, that help), one per field
    settings = from_args(SynthSettings, args)     # the dataclass back from the parsed flags

A flag is `--field-name` unless the field's metadata names another (`flag`, kept where users have the old name);
its dest is always the field's name. A bool field that defaults to False is a switch that turns it on, one that
defaults to True a switch (named by `flag`) that turns it off, one that defaults to None `--x/--no-x`. A
`tuple[str, ...]` field takes any number of values after its flag, or with `repeat` one value each time the flag is
given; its values come back as a tuple. `required` names the fields whose flag a parser requires (the same dataclass
may be required in one command and optional in another).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def setting(
    default, help: str, *, flag: str | None = None, choices=None, metavar: str | None = None, repeat: bool = False
):
    """A dataclass field with what its command-line flag needs: the default and help text live here only."""
    meta = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "repeat": repeat or None}
    return dataclasses.field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _value_type(hint) -> type:
    """int for `int` and `int | None`, str for `tuple[str, ...]`; the flag's argparse type."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else hint


def add_settings(
    parser: argparse.ArgumentParser, cls, names: typing.Iterable[str] | None = None, required: typing.Iterable[str] = ()
) -> None:
    """One flag per field of `cls` (or per field named), from its type, default and metadata (`setting`); the
    fields in `required` must be given (their default stands for "not given")."""
    hints, required = typing.get_type_hints(cls), set(required)
    wanted = [f for f in dataclasses.fields(cls) if names is None or f.name in set(names)]
    for f in wanted:  # all checked before any flag is added
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no help text: declare it with genpi.flags.setting")
    for f in wanted:
        kind, help = _value_type(hints[f.name]), f.metadata["help"]
        if kind is bool and f.default is None:
            parser.add_argument(
                flag_name(f), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help
            )
        elif typing.get_origin(hints[f.name]) is tuple:
            many = {"action": "append"} if f.metadata.get("repeat") else {"nargs": "*"}
            metavar = f.metadata.get("metavar")
            parser.add_argument(flag_name(f), dest=f.name, default=list(f.default), metavar=metavar, help=help, **many)
        elif kind is bool:
            if f.default and "flag" not in f.metadata:
                raise TypeError(f"{cls.__name__}.{f.name} defaults to True: its switch needs a name (flag='--no-...')")
            action = "store_false" if f.default else "store_true"
            parser.add_argument(flag_name(f), dest=f.name, action=action, help=help)
        else:
            shown = "" if f.default is None or "default" in help else " (default %(default)s)"
            parser.add_argument(
                flag_name(f),
                dest=f.name,
                type=kind,
                default=f.default,
                choices=f.metadata.get("choices"),
                metavar=f.metadata.get("metavar"),
                required=f.name in required,
                help=help + ("" if f.name in required else shown),
            )


def from_args(cls, args: argparse.Namespace, **changes):
    """`cls` from the parsed flags of its fields (those the parser has), `changes` in place of some."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    given = {name: tuple(v) if isinstance(v, list) else v for name, v in given.items()}  # a tuple field's values
    return cls(**{**given, **changes})
