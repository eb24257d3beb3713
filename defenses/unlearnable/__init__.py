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
from defenses.unlearnable.clusters import unlearnable_clusters
from defenses.unlearnable.error_minimising import protect_classwise, protect_samplewise
from defenses.unlearnable.mi_ue import mi_ue
from defenses.unlearnable.random_noise import protect_random

METHODS: dict[str, Method] = {
    "em-classwise": protect_classwise,
    "em-samplewise": protect_samplewise,
    "random": protect_random,
    "mi-ue": mi_ue,
    "uc": unlearnable_clusters,
}

__all__ = ["METHODS", "Method", "ProtectionResult", "UnlearnableError", "check_eps", "project"]
