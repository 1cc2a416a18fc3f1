"""Helpers shared by the per-stage config dataclasses: building them from YAML mappings with
errors that name the field, the value and what would be accepted."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T")

SCALARS = (int, float, str, bool)


class ConfigError(ValueError):
    """A config value is wrong; the message names the field."""


def check(condition: bool, field: str, value: Any, accepted: str) -> None:
    if not condition:
        raise ConfigError(f"{field}={value!r} is invalid: expected {accepted}")


def build(cls: type[T], data: Mapping[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys, missing values (null for a
    field that is not optional), wrong scalar or element types and non-finite numbers.

    ``data`` None (an empty YAML section) means all defaults. Lists become tuples where the field
    is a tuple, so the frozen dataclasses stay hashable.
    """
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{where}={data!r} is invalid: expected a mapping of {cls.__name__} fields")
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    removed = getattr(cls, "REMOVED_FIELDS", {})  # field -> why it went and what replaces it
    for name in unknown:
        if name in removed:
            raise ConfigError(f"{where}.{name} was removed: {removed[name]}")
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; accepted: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        data[name] = _convert(value, hints[name], f"{where}.{name}")
    try:
        return cls(**data)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e}") from None


def _convert(value: Any, hint: Any, field: str) -> Any:
    """``value`` checked against type ``hint`` (converted where YAML cannot say it: int -> float,
    list -> tuple); raises ``ConfigError`` naming ``field``."""
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{field}={value!r} is invalid: expected a mapping of {hint.__name__} fields")
        return build(hint, value, field)
    if value is None:
        if _optional(hint):
            return None
        raise ConfigError(f"{field}=None is invalid: a value is required (expected {_describe(hint)})")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) == 1:  # ``X | None`` with a value: X's own, more precise, error
            return _convert(value, options[0], field)
        for option in options:
            try:
                return _convert(value, option, field)
            except ConfigError:
                continue
        raise ConfigError(f"{field}={value!r} is invalid: expected {_describe(hint)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{field}={value!r} is invalid: expected {_describe(hint)}")
        args = typing.get_args(hint)
        if not args:
            item_types = [Any] * len(value)
        elif origin is list or args[-1] is Ellipsis:  # list[X] and tuple[X, ...]: any number of X
            item_types = [args[0]] * len(value)
        else:  # tuple[X, Y]: exactly one of each
            item_types = list(args)
            if len(item_types) != len(value):
                raise ConfigError(f"{field}={value!r} is invalid: expected {_describe(hint)}")
        items = []
        for i, (item, item_type) in enumerate(zip(value, item_types)):
            try:
                items.append(_convert(item, item_type, f"{field}[{i}]"))
            except ConfigError:
                if dataclasses.is_dataclass(item_type):
                    raise  # the item's own error names the field inside it (``models[1].weight``)
                raise ConfigError(
                    f"{field}={value!r} is invalid: expected {_describe(hint)} (item {i} is {item!r})"
                ) from None
        return tuple(items) if origin is tuple else items
    if hint in SCALARS:
        if hint is float and isinstance(value, str):
            value = _number_from_text(value, field)
        if not _is(value, hint):
            raise ConfigError(f"{field}={value!r} is invalid: expected {hint.__name__}")
        if hint is float:
            # YAML reads .inf, .nan and 1.0e400 as floats; no setting here means anything with them
            if not math.isfinite(value):
                raise ConfigError(f"{field}={value!r} is invalid: expected a finite number")
            return float(value)
        return value
    return value  # Any, or a type the YAML cannot express: the dataclass checks it


def _number_from_text(value: str, field: str) -> Any:
    """PyYAML (YAML 1.1) reads ``3e-4`` and ``1e400``, exponents without a dot, as text; take
    them as the numbers they obviously are (other text is left for the type check to refuse)."""
    try:
        number = float(value)
    except ValueError:
        return value
    if not math.isfinite(number):
        raise ConfigError(f"{field}={value!r} is invalid: expected a finite number")
    return number


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _describe(hint: Any) -> str:
    """A readable name for a type hint: ``int``, ``int or null``, ``a list of int``."""
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} fields"
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin in (tuple, list):
        if not args:
            return "a list"
        if origin is list or args[-1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} items ({', '.join(_describe(a) for a in args)})"
    return getattr(hint, "__name__", str(hint))


def _is(value: Any, typ: type) -> bool:
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)
