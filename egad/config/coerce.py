"""Convert config values to their fields' declared types, so a value from YAML or the command line is checked once.

PyYAML reads YAML 1.1, where `1e-4` is a string, and command-line values arrive as text. Both go through `coerce`,
which knows the field's annotation (`typing.get_type_hints`): text is parsed by the rules of the target type, a
`str` field keeps the text verbatim, and a value that does not fit raises a ConfigError naming field, value and type.
"""

from __future__ import annotations

import functools
import os
import re
import types
import typing
from dataclasses import fields
from typing import Any, Union

import yaml

from egad.config.schema import ConfigError

NULL_WORDS = frozenset({"null", "~", "none", ""})
"""Text read as None by an Optional field (the empty text too: "leave empty" in the field docs)."""
TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})
_INT_TEXT = re.compile(r"[-+]?[0-9][0-9_]*")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` and `1.0e5` as floats (YAML 1.2 does), also inside dicts and lists."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: Any) -> Any:
    """yaml.safe_load (a string or a stream) with exponent floats; the loader of config files and CLI lists/dicts."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


class _Mismatch(Exception):
    """Raised inside the conversion; `coerce` turns it into a ConfigError about the whole value."""


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation of a dataclass (its module may use `from __future__ import annotations`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in fields(cls)}


def coerce(value: Any, tp: Any, name: str) -> Any:
    """`value` converted to type `tp`; ConfigError "name=value is not TYPE" when it does not fit."""
    try:
        return _convert(value, tp)
    except _Mismatch:
        raise ConfigError(f"{name}={value!r} is not {describe(tp)}") from None


def coerce_fields(cls: type, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Every known field of `values` converted to its type in dataclass `cls`; other keys are passed through."""
    types_ = field_types(cls)
    return {k: coerce(v, types_[k], f"{prefix}.{k}") if k in types_ else v for k, v in values.items()}


def describe(tp: Any) -> str:
    """A type as the error messages spell it: 'an int', 'a float or null', 'a list of 2 floats'."""
    if tp is type(None):
        return "null"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in sorted(args, key=lambda a: a is type(None)))
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            inner = {describe(a) for a in args}
            if len(inner) == 1:
                return f"a list of {len(args)} {_plural(args[0])}"
            return f"a list [{', '.join(_bare(a) for a in args)}]"
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return "a dict {key: value}"
    if tp is tuple or tp is list:
        return "a list"
    if tp is bool:
        return "a bool (true/false)"
    name = _bare(tp)
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def _bare(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _plural(tp: Any) -> str:
    return f"{_bare(tp)}s"


def _convert(value: Any, tp: Any) -> Any:
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return _convert_union(value, args)
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.strip().lower() in NULL_WORDS):
            return None
        raise _Mismatch
    if tp is str:
        return _to_str(value)
    if tp is bool:
        return _to_bool(value)
    if tp is int:
        return _to_int(value)
    if tp is float:
        return _to_float(value)
    if origin in (tuple, list) or tp in (tuple, list):
        return _to_sequence(value, origin or tp, args)
    if origin is dict or tp is dict:
        return _to_dict(value, args)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Mismatch


def _convert_union(value: Any, args: tuple[Any, ...]) -> Any:
    if type(None) in args:
        try:
            return _convert(value, type(None))
        except _Mismatch:
            pass
    rest = [a for a in args if a is not type(None)]
    if str in rest and isinstance(value, str):
        return value  # a str arm takes text verbatim
    for arm in rest:
        try:
            return _convert(value, arm)
        except _Mismatch:
            continue
    raise _Mismatch


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise _Mismatch  # e.g. YAML read `revision: 0123` as a number: the user has to quote it


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise _Mismatch


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if _INT_TEXT.fullmatch(text):
            return int(text)  # decimal: "0123" is 123 here, not YAML 1.1's octal 83
        value = _parse_float(text)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _Mismatch


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return _parse_float(value.strip())
    raise _Mismatch


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _Mismatch from None


def _parse_collection(value: Any) -> Any:
    """Text of a list or dict, as a YAML flow collection: `[0.9, 0.95]`, `{vocab_size: 512}`."""
    if not isinstance(value, str):
        return value
    try:
        return load_yaml(value)
    except yaml.YAMLError:
        raise _Mismatch from None


def _to_sequence(value: Any, kind: type, args: tuple[Any, ...]) -> tuple | list:
    value = _parse_collection(value)
    if not isinstance(value, (list, tuple)):
        raise _Mismatch
    if kind is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise _Mismatch
        items = [_convert(v, a) for v, a in zip(value, args, strict=True)]
    else:
        item = args[0] if args else Any
        items = [_convert(v, item) for v in value]
    return tuple(items) if kind is tuple else items


def _to_dict(value: Any, args: tuple[Any, ...]) -> dict:
    value = _parse_collection(value)
    if not isinstance(value, dict):
        raise _Mismatch
    if not args:
        return dict(value)
    key_tp, val_tp = args
    return {_convert(k, key_tp): _convert(v, val_tp) for k, v in value.items()}


__all__ = ["NULL_WORDS", "coerce", "coerce_fields", "describe", "field_types", "load_yaml"]
