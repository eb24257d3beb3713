"""The sanitisation rule both methods share: keep the training images whose confidence on
their own label, under a judging model (the canonical model, or the parent itself), is at or
above the threshold. Confidences come from ``mlcore.divergences`` in float64 log space, so the
paper's 0.9999999 is distinguishable from 1."""

from __future__ import annotations

import numpy as np
from torch import nn

from defenses.sanitization.errors import SanitizationError, check_unit_interval
from mlcore.datasets import ImageDataset
from mlcore.divergences import confident_indices
from mlcore.training import predict_logits

MIN_PER_CLASS = 10  # a sanitised model cannot learn a class it keeps fewer images of


def confident_subset(judge: nn.Module, train: ImageDataset, threshold: float) -> np.ndarray:
    """Indices into ``train`` (ascending) that ``judge`` gives confidence >= ``threshold`` on
    their label."""
    check_unit_interval("threshold", threshold)
    return confident_indices(predict_logits(judge, train.images), train.labels, threshold)


def keep_confident(
    judge: nn.Module,
    train: ImageDataset,
    threshold: float,
    *,
    min_per_class: int = MIN_PER_CLASS,
) -> np.ndarray:
    """``confident_subset``, refused (SanitizationError) when some class keeps fewer than
    ``min_per_class`` images."""
    kept = confident_subset(judge, train, threshold)
    per_class = np.bincount(train.labels.numpy()[kept], minlength=train.num_classes)
    if per_class.min() < min_per_class:
        short = {c: int(n) for c, n in enumerate(per_class) if n < min_per_class}
        raise SanitizationError(
            f"too few images left: {len(kept)} of {len(train)} training images have confidence "
            f">= {threshold} on their label, and classes {short} keep fewer than "
            f"{min_per_class} each (lower the threshold or train the judging model longer)"
        )
    return kept
