"""Self sanitisation (paper Section 3.2): the parent, trained on every training image, judges
its own training set; images it is not confident about on their label are the outliers."""

from __future__ import annotations

import numpy as np
from torch import nn

from defenses.sanitization.selection import keep_confident
from mlcore.datasets import ImageDataset


def self_sanitize(parent: nn.Module, train: ImageDataset, threshold: float) -> np.ndarray:
    """Indices of the parent's training images it gives confidence >= ``threshold``."""
    return keep_confident(parent, train, threshold)
