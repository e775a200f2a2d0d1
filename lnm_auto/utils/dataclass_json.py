"""Dataclass <-> JSON dict round-trip for typed, human-readable files (plans, topologies)."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, get_args, get_origin, get_type_hints


def to_dict(obj: Any) -> Any:
    """Dataclasses, tuples and dicts -> JSON-ready dicts and lists, recursively."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls, data: Any) -> Any:
    """Build ``cls`` from a dict produced by ``to_dict``: nested dataclasses, tuples, dicts, Optionals."""
    return _convert(cls, data)


def _convert(tp, value):
    if value is None:
        return None
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        for a in args:  # first alternative that fits
            try:
                return _convert(a, value)
            except (TypeError, ValueError, KeyError):
                continue
        raise ValueError(f"{value!r} fits none of {args}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"expected an object for {tp.__name__}, got {type(value).__name__}")
        hints = get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = set(value) - names
        if unknown:
            raise KeyError(f"unknown field(s) {sorted(unknown)} for {tp.__name__}")
        return tp(**{k: _convert(hints[k], v) for k, v in value.items()})
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v) for v in value)
        return tuple(_convert(a, v) for a, v in zip(args, value)) if args else tuple(value)
    if origin is list:
        (a,) = get_args(tp) or (Any,)
        return [_convert(a, v) for v in value]
    if origin is dict:
        ka, va = get_args(tp) or (Any, Any)
        return {_convert(ka, k): _convert(va, v) for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise TypeError("bool is not int")
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise TypeError(f"expected {tp.__name__}, got {value!r}")
    return value
