"""Helpers shared by the per-stage config dataclasses: building them from YAML mappings with
errors that name the field, the value and what would be accepted."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong; the message names the field."""


def check(condition: bool, field: str, value: Any, accepted: str) -> None:
    if not condition:
        raise ConfigError(f"{field}={value!r} is invalid: expected {accepted}")


def build(cls: type[T], data: Mapping[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong scalar types."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; accepted: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}.{name}={value!r} is invalid: expected a mapping of {hint.__name__} fields")
            data[name] = build(hint, value, f"{where}.{name}")
            continue
        origin = typing.get_origin(hint)
        allowed = typing.get_args(hint) if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) else (hint,)
        scalar = [a for a in allowed if a in (int, float, str, bool)]
        if scalar and value is not None and not any(_is(value, a) for a in scalar):
            raise ConfigError(f"{where}.{name}={value!r} is invalid: expected {' or '.join(a.__name__ for a in scalar)}")
        if float in scalar and isinstance(value, int) and not isinstance(value, bool):
            data[name] = float(value)
    try:
        return cls(**data)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e}") from None


def _is(value: Any, typ: type) -> bool:
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)
