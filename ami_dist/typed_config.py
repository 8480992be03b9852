"""Typed config trees: dataclasses built from YAML mappings, every value checked, errors naming the key.

A schema is a tree of dataclasses whose fields are declared with :func:`spec` (default, description,
bounds). :func:`build` turns a plain mapping into that tree and raises :class:`ConfigError` naming the
file, line and dotted key of the first value that does not fit.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from ami_dist.errors import ConfigError


def spec(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A config field with its default, a one-line description and optional numeric bounds."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Located:
    """Where each dotted key of a config was written (``file:line`` or ``command line``), for errors."""

    def __init__(self, source: str, places: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.places = dict(places or {})

    def where(self, key: str) -> str:
        """``file:line: key`` for the nearest enclosing key whose place is known, else ``file: key``."""
        parts = key.split(".")
        while parts:
            place = self.places.get(".".join(parts))
            if place is not None:
                return f"{place}: {key}"
            parts.pop()
        return f"{self.source}: {key}"


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str, loc: Located) -> Any:
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        for option in get_args(tp):
            try:
                return _convert(value, option, key, loc)
            except ConfigError:
                continue
        raise ConfigError(f"{loc.where(key)}: expected {_describe(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item,) = get_args(tp)
            return [_convert(v, item, f"{key}[{i}]", loc) for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, Mapping):
            return build(tp, value, loc, prefix=key)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema bug, not a user mistake
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    raise ConfigError(f"{loc.where(key)}: expected {_describe(tp)}, got {value!r}")


def _check_bounds(value: Any, meta: Mapping[str, Any], key: str, loc: Located) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    checks = (
        ("ge", lambda b: value >= b, ">="),
        ("gt", lambda b: value > b, ">"),
        ("le", lambda b: value <= b, "<="),
        ("lt", lambda b: value < b, "<"),
    )
    for name, ok, sym in checks:
        bound = meta.get(name)
        if bound is not None and not ok(bound):
            raise ConfigError(f"{loc.where(key)}: expected a value {sym} {bound}, got {value!r}")


def build(cls: type, data: Mapping[str, Any], loc: Located, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types and out-of-range values are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            key = f"{prefix}.{name}" if prefix else str(name)
            renamed = getattr(cls, "RENAMED", {})
            if name in renamed:
                raise ConfigError(f"{loc.where(key)}: renamed to {prefix + '.' if prefix else ''}{renamed[name]}")
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{loc.where(key)}: unknown key (known keys here: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            # A section starts from the field's own default (which may differ from its class defaults)
            # with the given keys on top; an omitted section is built too, so its checks still run.
            given = data.get(name, {})
            if not isinstance(given, Mapping):
                raise ConfigError(f"{loc.where(key)}: expected a mapping, got {given!r}")
            unknown = [k for k in given if k not in {g.name for g in dataclasses.fields(tp)}]
            if not unknown:
                given = {**to_dict(f.default_factory()), **given}  # type: ignore[misc]
            kwargs[name] = build(tp, given, loc, prefix=key)
            continue
        if name not in data:
            continue
        value = _convert(data[name], tp, key, loc)
        _check_bounds(value, f.metadata, key, loc)
        kwargs[name] = value
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(lambda key, msg: ConfigError(f"{loc.where(f'{prefix}.{key}' if prefix else key)}: {msg}"))
    return obj


def to_dict(obj: Any) -> Any:
    """The plain (YAML/JSON-ready) form of a config tree."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; used to log the resolved config as MLflow params."""
    out: dict[str, Any] = {}
    for name, value in tree.items():
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(value, Mapping):
            out.update(flatten(value, key))
        else:
            out[key] = value
    return out

