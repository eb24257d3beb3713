"""Method options by name (``--option KEY=VALUE``): an unknown name is refused with the known ones
listed, instead of a TypeError from deep inside the method."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from defenses.unlearnable.base import UnlearnableError

_COMMON = {"images", "labels", "eps", "seed", "progress", "resume_path"}


def check_option_names(
    method: str, implementation: Callable[..., Any], options: dict[str, Any]
) -> None:
    """Raise UnlearnableError unless every option is a keyword of ``implementation``."""
    known = set(inspect.signature(implementation).parameters) - _COMMON
    unknown = sorted(set(options) - known)
    if unknown:
        raise UnlearnableError(f"unknown {method} option(s) {unknown}; known: {sorted(known)}")
