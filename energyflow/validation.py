"""Checks of configuration values, shared by the trainer and every domain's experiment: each
failure is an :class:`~energyflow.errors.InputError` whose message names the key."""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

from .errors import InputError

__all__ = ["check_integer", "check_number", "check_mapping"]


def check_integer(value: Any, key: str, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """``value`` as an ``int`` (integral floats and numpy integers accepted, booleans refused),
    within ``[minimum, maximum]`` when given."""
    if (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
            and float(value).is_integer() and (minimum is None or value >= minimum)
            and (maximum is None or value <= maximum)):
        return int(value)
    bounds = [f">= {minimum}"] * (minimum is not None) + [f"<= {maximum}"] * (maximum is not None)
    need = "an integer" + (" " + " and ".join(bounds) if bounds else "")
    raise InputError(f"{key} must be {need}, got {value!r}")


def check_number(value: Any, key: str, low: Optional[float] = None, high: Optional[float] = None,
                 low_inclusive: bool = True, high_inclusive: bool = False) -> float:
    """``value`` as a finite ``float`` within the given bounds (``low`` inclusive and ``high``
    exclusive by default)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if ok:
        return float(value)
    bounds = []
    if low is not None:
        bounds.append(f"{'>=' if low_inclusive else '>'} {low:g}")
    if high is not None:
        bounds.append(f"{'<=' if high_inclusive else '<'} {high:g}")
    need = " " + " and ".join(bounds) if bounds else ""
    raise InputError(f"{key} must be a finite number{need}, got {value!r}")


def check_mapping(value: Any, key: str, allowed: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """A dict copy of ``value`` (``None`` → ``{}``) whose keys are in ``allowed`` (``None``: any)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{key} must be a mapping, got {value!r}")
    unknown = sorted(set(value) - set(allowed)) if allowed is not None else []
    if unknown:
        raise InputError(f"{key}: unknown key(s) {unknown}; valid keys are {sorted(allowed)}")
    return dict(value)
