"""Plain data (JSON-able) for the campaign engine's frozen dataclasses, and back.

One generic codec, driven by the dataclasses' own type hints, so that a field added to a spec
or an event is serialised without a second list to keep in step: a dataclass becomes a dict of
its fields, an enum its value, a tuple a list, a frozenset a sorted list, a dict with string
keys a dict. :func:`from_data` reverses it for the declared type (``X | None``,
``tuple[X, ...]``, ``list[X]``, ``frozenset[X]``, ``dict[str, X]``, enums, dataclasses and the
float ``NewType``\\ s of :mod:`protocol.clock`). Unions of several dataclasses are not
supported: the engine's records carry a ``kind`` enum instead.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any, TypeVar, cast

_T = TypeVar("_T")


_PLAIN = frozenset({str, int, float, bool, type(None)})


def to_data(value: Any) -> Any:
    """``value`` as plain JSON-able data (see the module docstring)."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    names = _field_names(kind)
    if names is not None:
        return {name: to_data(getattr(value, name)) for name in names}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [to_data(v) for v in value]
    if isinstance(value, frozenset):
        return sorted(to_data(v) for v in value)
    if isinstance(value, dict):
        return {str(k): to_data(v) for k, v in value.items()}
    return value


def _field_names(cls: type) -> tuple[str, ...] | None:
    """The init fields of a dataclass type (None: not one), cached per type."""
    try:
        return _FIELDS[cls]
    except KeyError:
        names = None
        if dataclasses.is_dataclass(cls):
            names = tuple(f.name for f in dataclasses.fields(cls) if f.init)
        _FIELDS[cls] = names
        return names


_FIELDS: dict[type, tuple[str, ...] | None] = {}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_data(cls: type[_T], data: Any) -> _T:
    """The value of type ``cls`` that :func:`to_data` turned into ``data``."""
    return cast(_T, _decode(cls, data))


def _decode(tp: Any, data: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if data is None:
            return None
        if len(members) != 1:
            raise TypeError(f"cannot decode a union of several types: {tp}")
        return _decode(members[0], data)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v) for v in data)
        return tuple(_decode(a, v) for a, v in zip(args, data, strict=True))
    if origin is list:
        (arg,) = typing.get_args(tp)
        return [_decode(arg, v) for v in data]
    if origin is frozenset:
        (arg,) = typing.get_args(tp)
        return frozenset(_decode(arg, v) for v in data)
    if origin is dict:
        _key, arg = typing.get_args(tp)
        return {k: _decode(arg, v) for k, v in data.items()}
    if isinstance(tp, typing.NewType):
        return tp(_decode(tp.__supertype__, data))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        kwargs = {
            f.name: _decode(hints[f.name], data[f.name])
            for f in dataclasses.fields(tp)
            if f.init and f.name in data
        }
        return tp(**kwargs)
    if tp is float and isinstance(data, int):
        return float(data)
    return data
