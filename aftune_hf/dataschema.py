"""Frozen dataclasses from and to plain YAML/JSON mappings: strict types, unknown keys refused.

Used by :mod:`aftune_hf.contract`. ``Literal`` fields must hold one of their values, ``bool`` is not
an ``int``, numeric strings (PyYAML reads ``1e-3`` as one) are accepted for ``float`` fields.

Example:
    >>> build_dataclass(Padding, {"side": "left"}, "training.padding.")   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

from .errors import ConfigError


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError("contract_invalid", f"{where or 'contract'} must be a mapping")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.name != "source_dir"}
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        raise ConfigError(
            "unknown_key", f"{', '.join(where + k for k in unknown)} (allowed: {', '.join(sorted(known))})"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], where + f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError("missing_key", f"{where}{f.name} is required")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError("contract_invalid", f"{where or 'contract'}: {e}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where + ".")
    if origin is Literal:
        if value not in args:
            raise ConfigError("invalid_value", f"{where}={value!r}, expected one of {list(args)}")
        return value
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError("invalid_value", f"{where} must be a non-empty list")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Mapping or tp is Mapping:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError("invalid_value", f"{where} must be a mapping with string keys")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError("invalid_value", f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError("invalid_value", f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError("invalid_value", f"{where} must be a number, got {value!r}")
        try:
            out = float(value)  # PyYAML reads '1e-3' as a string: accept numeric strings
        except (TypeError, ValueError):
            raise ConfigError("invalid_value", f"{where} must be a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError("invalid_value", f"{where} must be finite")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError("invalid_value", f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError("invalid_value", f"{where}: unsupported type {tp}")  # pragma: no cover


def plain(obj: Any) -> Any:
    """A dataclass (nested) as plain dicts and lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: plain(getattr(obj, f.name)) for f in fields(obj) if f.name != "source_dir"}
    if isinstance(obj, tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    return obj
