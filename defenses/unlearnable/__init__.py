"""Unlearnable examples (seeds 003 and 004): small L-inf noise a data owner adds to images
before publishing them, so that a model trained on them learns little. ``METHODS`` maps each
method's name to its callable (the contract is in ``base.py``)."""

from __future__ import annotations

from defenses.unlearnable.base import (
    Method,
    ProtectionResult,
    UnlearnableError,
    check_eps,
    project,
)

METHODS: dict[str, Method] = {}

__all__ = ["METHODS", "Method", "ProtectionResult", "UnlearnableError", "check_eps", "project"]
