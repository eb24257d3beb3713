"""The one exception of the sanitisation package: every bad input raises it, with the value."""

from __future__ import annotations


class SanitizationError(ValueError):
    """A threshold, pass rate, font folder, data set or checkpoint pair that cannot be used."""


def check_unit_interval(name: str, value: float) -> float:
    """``value`` must lie strictly inside (0, 1): a threshold or a pass rate."""
    if not 0.0 < value < 1.0:
        raise SanitizationError(f"{name} must be in (0, 1), got {value}")
    return float(value)
