"""Typed specifications whose fields are the options, defined once.

A specification is a dataclass whose fields are declared with :func:`option`: the default, the help
text, how to read the value from a command-line string, and the check of its range. Everything that
spells options out is derived from those fields:

* :func:`add_arguments`: one ``--flag`` per field for argparse (``--set`` for the ``options`` list);
* :func:`from_mapping`: a config file's keys, with one-line errors naming the key;
* :func:`to_argv` / :func:`to_mapping`: the command line / the config file that rebuild a spec;
* :func:`check`: every field's range check.

``localcredit.experiment.RunSpec`` composes the network's, the training loop's and the optimiser's
specifications with the rule and the data; the CLI, config files, the bench, the probe and the
checkpoint fingerprint all derive from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, field, fields
from typing import Any

from .errors import UserError, did_you_mean

Check = Callable[[Any], "str | None"]  # a problem with the value, as the end of a sentence, or None


def option(default: Any = MISSING, help: str = "", parse: Callable[[str], Any] | None = None,
           metavar: str | None = None, check: Check | None = None, flag: str | None = None,
           repeated: bool = False) -> Any:
    """A specification field that is an option: ``parse`` reads it from a command-line string (default: by
    the field's type, :func:`parse_as`), ``check`` says what is wrong with a value (None: nothing).
    ``repeated``: a list given by repeating ``flag``. Run options, rule options and strategy options are all
    declared with it."""
    metadata = {"help": help, "parse": parse, "metavar": metavar, "check": check, "flag": flag, "repeated": repeated}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def is_option(f: dataclasses.Field) -> bool:
    return "help" in f.metadata


def option_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in fields(cls) if is_option(f)]


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def parser_of(cls: type, f: dataclasses.Field) -> Callable[[str], Any]:
    """How option ``f`` of ``cls`` reads a command-line string: its own ``parse``, or by its type (for a
    repeated option, by its items' type)."""
    hint = typing.get_type_hints(cls)[f.name]
    return f.metadata["parse"] or parse_as(_item_type(hint) if f.metadata["repeated"] else hint)


def _item_type(hint: Any) -> Any:
    (item,) = typing.get_args(_non_none(hint)) or (str,)
    return item


def parse_as(hint: Any) -> Callable[[str], Any]:
    """A parser for a field of type ``hint`` (a Literal of strings, bool, int, float or str, or one of them
    or None); a bad string is a UserError ending a sentence ("is not one of a, b")."""
    kind = _non_none(hint)
    choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else ()
    if choices:
        def choice(raw: str) -> str:
            if raw not in choices:
                raise UserError(f"is not one of {', '.join(map(str, choices))}")
            return raw
        return choice
    if kind is bool:
        return parse_bool
    if kind in (int, float, str):
        def scalar(raw: str) -> Any:
            try:
                return kind(raw)
            except ValueError:
                raise UserError(f"is not a valid {kind.__name__}") from None
        scalar.__name__ = kind.__name__
        return scalar
    raise TypeError(f"no command-line parser for an option of type {hint!r}: give it parse=")


def parse_bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise UserError("is not a valid bool (true or false)")


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


# ----- command line -----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = ()) -> None:
    """One flag per option of ``cls``, grouped by the specification that defines it (``cls`` first,
    then the ones it inherits). Defaults are left out of the namespace (argparse.SUPPRESS), so
    :func:`given` returns only what the command line said: it can then override a config file."""
    by_name = {f.name: f for f in option_fields(cls)}
    for owner in cls.__mro__:
        own = [by_name[name] for name in owner.__dict__.get("__annotations__", {})
               if name in by_name and name not in exclude]
        if not own:
            continue
        group = parser.add_argument_group(owner.__dict__.get("TITLE", owner.__name__))
        for f in own:
            kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=_help(f),
                                          metavar=f.metadata["metavar"], type=_argparse_type(cls, f))
            if f.metadata["repeated"]:
                kwargs["action"] = "append"
            group.add_argument(flag_of(f), **kwargs)


def _help(f: dataclasses.Field) -> str:
    default = default_of(f)
    shown = "" if default is MISSING or default is None or default == [] else f" (default {_text(default)})"
    return f.metadata["help"] + shown


def _argparse_type(cls: type, f: dataclasses.Field) -> Callable[[str], Any]:
    parse, name = parser_of(cls, f), flag_of(f)

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{name} ")) from None

    convert.__name__ = getattr(parse, "__name__", f.name)  # argparse names it in "invalid float value"
    return convert


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of ``cls`` that the command line gave."""
    return {f.name: getattr(args, f.name) for f in option_fields(cls) if hasattr(args, f.name)}


def to_argv(spec: Any) -> list[str]:
    """The flags that rebuild ``spec`` (options at their default left out)."""
    argv: list[str] = []
    for f in option_fields(type(spec)):
        value = getattr(spec, f.name)
        if value == default_of(f):
            continue
        if f.metadata["repeated"]:
            for item in value:
                argv += [flag_of(f), str(item)]
        else:
            argv += [flag_of(f), _text(value) or "none"]
    return argv


def _text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


# ----- config files -----------------------------------------------------------------------------
def to_mapping(spec: Any, first: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every option of ``spec`` as plain YAML-able values, the fields ``first`` first."""
    names = [f.name for f in option_fields(type(spec))]
    ordered = [*first, *(n for n in names if n not in first)]
    return {name: _plain(getattr(spec, name)) for name in ordered}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def from_mapping(cls: type, mapping: Any, source: str) -> dict[str, Any]:
    """Typed option values of ``cls`` from a config file's mapping; a bad key or value is a one-line
    UserError naming ``source`` and the key."""
    if not isinstance(mapping, dict):
        raise UserError(f"{source}: expected a mapping of option: value, got {type(mapping).__name__}")
    known = {f.name: f for f in option_fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for raw_key, value in mapping.items():
        key = str(raw_key).replace("-", "_")
        if key not in known:
            raise UserError(f"{source}: unknown key {raw_key!r}{did_you_mean(key, known)}; "
                            f"the keys are {', '.join(known)}")
        try:
            values[key] = _coerce(known[key], hints[key], value)
        except (UserError, ValueError, TypeError) as exc:
            raise UserError(f"{source}: {key}: {str(exc).removeprefix(flag_of(known[key]) + ' ')}") from None
        test = known[key].metadata["check"]
        problem = test(values[key]) if test is not None and values[key] is not None else None
        if problem:
            raise UserError(f"{source}: {key} {problem}")
    return values


def _coerce(f: dataclasses.Field, hint: Any, value: Any) -> Any:
    """A config file's value as the field's type: strings go through the field's command-line parser."""
    parse = f.metadata["parse"] or parse_as(_item_type(hint) if f.metadata["repeated"] else hint)
    if value is None:
        if _allows_none(hint):
            return None
        raise ValueError("must not be empty")
    if f.metadata["repeated"]:
        if isinstance(value, dict):  # options: {key: value} is --set key=value
            return [f"{k}={_scalar_text(v)}" for k, v in value.items()]
        items = value if isinstance(value, list) else [value]
        return [parse(_scalar_text(item)) for item in items]
    if isinstance(value, str):
        return parse(value)
    kind = _non_none(hint)
    if typing.get_origin(kind) is list:
        items = value if isinstance(value, list) else [value]  # `milestones: 50` is the list [50]
        if any(isinstance(item, (list, dict)) for item in items):
            raise ValueError(f"expected a list of numbers, got {value!r}")
        return parse(",".join(map(_scalar_text, items)) or "none")
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    raise ValueError(f"expected {getattr(kind, '__name__', kind)}, got {value!r}")


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _allows_none(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _non_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


# ----- key=value lists and Python values (a rule's or a strategy's options) ----------------------
def from_assignments(cls: type, assignments: list[str] | tuple[str, ...], owner: str = "this rule") -> dict[str, Any]:
    """Typed option values of ``cls`` from ``key=value`` strings (``--set``, ``--strategy-set``); a bad
    key or value is a one-line UserError naming it (``owner``: whose options, as the message says it)."""
    known = {f.name: f for f in option_fields(cls)}
    values: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got {assignment!r}")
        _known(key, known, owner)
        try:
            values[key] = parser_of(cls, known[key])(raw.strip())
        except UserError as exc:
            raise UserError(f"option {key}={raw.strip()!r} {exc}") from None
    return values


def check_values(cls: type, values: dict[str, Any], owner: str = "this rule") -> None:
    """Python values for options of ``cls`` (``lc.make_rule(..., loss="ce")``): known names, right types."""
    known = {f.name: f for f in option_fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        _known(key, known, owner)
        _check_type(key, value, _non_none(hints[key]) if value is not None else type(None))


def _known(key: str, known: dict[str, dataclasses.Field], owner: str) -> None:
    if key not in known:
        raise UserError(f"unknown option {key!r} for {owner}{did_you_mean(key, known)}; "
                        f"its options are: {', '.join(known) or 'none'}")


def _check_type(key: str, value: Any, kind: Any) -> None:
    choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
    if choices:
        if value not in choices:
            raise UserError(f"option {key}={value!r} is not one of {', '.join(map(str, choices))}")
        return
    if not isinstance(kind, type):
        return  # a list or another composite type: the option's check looks at it
    allowed = (int, float) if kind is float else (kind,)
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, allowed):
        raise UserError(f"option {key}={value!r} is not a valid {kind.__name__}")


def describe(cls: type) -> list[dict[str, Any]]:
    """Name, type, default and help of every option of ``cls`` (``localcredit rules`` and ``strategies``)."""
    hints = typing.get_type_hints(cls)
    return [{"name": f.name, "type": _type_name(hints[f.name]), "default": default_of(f),
             "help": f.metadata["help"]} for f in option_fields(cls)]


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is typing.Literal:
        return "|".join(map(str, typing.get_args(kind)))
    return getattr(kind, "__name__", str(kind))


# ----- checks -----------------------------------------------------------------------------------
def problems(spec: Any) -> list[tuple[dataclasses.Field, str]]:
    """Every option whose range check fails, with what is wrong."""
    found = []
    for f in option_fields(type(spec)):
        test = f.metadata["check"]
        value = getattr(spec, f.name)
        problem = test(value) if test is not None and value is not None else None
        if problem:
            found.append((f, problem))
    return found


def check(spec: Any, source: str | None = None) -> None:
    """Run every option's range check; a problem is a one-line UserError naming the flag (or, with a
    ``source`` such as ``make_rule``, ``source: name``)."""
    for f, problem in problems(spec)[:1]:
        where = f"{source}: {f.name}" if source else flag_of(f)
        raise UserError(f"{where} {problem}")


def at_least(minimum: float) -> Check:
    return lambda value: None if value >= minimum else f"must be at least {minimum}, got {value}"


def positive(value: float) -> str | None:
    return None if value > 0 else f"must be positive, got {value}"


def one_of(*choices: str) -> Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"


def parse_ints(text: str) -> list[int]:
    """``"50,75"`` -> [50, 75]; ``""`` or ``"none"`` -> []."""
    text = text.strip()
    if text in ("", "none"):
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"expects comma-separated integers like 50,75, got {text!r}") from None
