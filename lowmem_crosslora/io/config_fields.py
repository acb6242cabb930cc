"""Typed reading of the config files the tool trusts (adapter_config.json, config.json): every field
it reads, its type and range, finite numbers only, one line naming the field when a value is wrong.

JSON gives us bool, int, float, str, list, dict and None; PEFT and transformers mean specific ones
(an int rank, a number alpha). Nothing is coerced: "8", 8.0 or true where an int is meant is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lowmem_crosslora.errors import InputError

MISSING = object()


def _bad(where: str, key: str, want: str, value: Any) -> InputError:
    shown = repr(value)
    return InputError(f"{where}: field {key!r} must be {want}, not {shown[:60] + '...' if len(shown) > 60 else shown}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and math.isfinite(v))


def integer(config: Mapping[str, Any], key: str, where: str, default: Any = MISSING, minimum: int = 1) -> int:
    """An int >= minimum (bools and floats refused)."""
    v = config.get(key, default)
    if v is MISSING or not _is_int(v) or v < minimum:
        raise _bad(where, key, f"an integer >= {minimum}", None if v is MISSING else v)
    return int(v)


def number(config: Mapping[str, Any], key: str, where: str, default: Any = MISSING) -> float:
    """A finite int or float (bools refused)."""
    v = config.get(key, default)
    if v is MISSING or not _is_number(v):
        raise _bad(where, key, "a finite number", None if v is MISSING else v)
    return float(v)


def boolean(config: Mapping[str, Any], key: str, where: str, default: bool = False) -> bool:
    v = config.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(where, key, "true or false", v)
    return v


def text(config: Mapping[str, Any], key: str, where: str, default: str) -> str:
    v = config.get(key, default)
    if v is None:
        return default
    if not isinstance(v, str):
        raise _bad(where, key, "a string", v)
    return v


def names(config: Mapping[str, Any], key: str, where: str) -> list[str]:
    """None, one string, or a list of strings."""
    v = config.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _bad(where, key, "a string or a list of strings", v)
    return list(v)


def int_map(config: Mapping[str, Any], key: str, where: str, minimum: int = 1) -> dict[str, int]:
    """None or an object of string -> int >= minimum."""
    v = config.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(_is_int(x) and x >= minimum for x in v.values()):
        raise _bad(where, key, f"an object of integers >= {minimum}", v)
    return dict(v)


def number_map(config: Mapping[str, Any], key: str, where: str) -> dict[str, float]:
    """None or an object of string -> finite number."""
    v = config.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(_is_number(x) for x in v.values()):
        raise _bad(where, key, "an object of finite numbers", v)
    return {k: float(x) for k, x in v.items()}


def layers(config: Mapping[str, Any], key: str, where: str) -> list[int] | None:
    """None, one layer index, or a list of them (>= 0)."""
    v = config.get(key)
    if v is None:
        return None
    if _is_int(v) and v >= 0:
        return [int(v)]
    if not isinstance(v, list) or not all(_is_int(x) and x >= 0 for x in v):
        raise _bad(where, key, "a layer index or a list of them", v)
    return list(v)


def check_adapter_config(config: Mapping[str, Any], where: str) -> list[str]:
    """Check every adapter_config.json field the tool reads; returns warnings (a non-positive alpha)."""
    where = f"{where}: adapter_config.json"
    text(config, "peft_type", where, "LORA")
    integer(config, "r", where, default=8)
    alpha = number(config, "lora_alpha", where, default=8)
    boolean(config, "use_rslora", where)
    boolean(config, "use_dora", where)
    boolean(config, "fan_in_fan_out", where)
    int_map(config, "rank_pattern", where)
    alphas = number_map(config, "alpha_pattern", where)
    names(config, "modules_to_save", where)
    text(config, "bias", where, "none")
    dropout = config.get("lora_dropout")
    if dropout is not None and (not _is_number(dropout) or not 0 <= dropout < 1):
        raise _bad(where, "lora_dropout", "a number in [0, 1)", dropout)
    layers(config, "layers_to_transform", where)
    target = config.get("target_modules")
    if target is not None and not isinstance(target, str):
        names(config, "target_modules", where)
    warnings = []
    if alpha <= 0 or any(a <= 0 for a in alphas.values()):
        warnings.append(f"{where}: lora_alpha (or an alpha_pattern value) is zero or negative: the adapter's update is scaled by it")
    return warnings
