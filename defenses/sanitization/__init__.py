"""Sanitised models and the divergence detector of adversarial queries ("Less is More", seed 001).

Sanitisation drops the training images a judging model is not confident about on their label
(canonical: a model trained on digits rendered from computer fonts; self: the parent model
itself), and trains a sanitised twin on the rest. An image on which the parent and its twin
disagree in distribution (KL, JS, or top label) is flagged as adversarial.
"""

from defenses.sanitization.errors import SanitizationError
from defenses.sanitization.pair import (
    Assessment,
    SanitizedPair,
    build_sanitized_pair,
    load_sanitized_pair,
    sanitized_checkpoint_path,
)

__all__ = [
    "Assessment",
    "SanitizationError",
    "SanitizedPair",
    "build_sanitized_pair",
    "load_sanitized_pair",
    "sanitized_checkpoint_path",
]
