"""Canonical sanitisation (paper Section 3.2): a *canonical model* trained on digits rendered from
computer fonts judges the real training set; images it is not confident about on their label are
the outliers. Only for MNIST-like data (1x28x28, ten digit classes).

The canonical model has the parent's architecture and trains on a seeded random 80% of the
rendered images; its accuracy on the other 20% and on the dataset's test split is reported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from defenses.sanitization.errors import SanitizationError
from defenses.sanitization.fonts import find_fonts, render_digits
from defenses.sanitization.selection import keep_confident
from mlcore.architectures import build_model
from mlcore.datasets import ImageDataset
from mlcore.training import accuracy, fit, seed_everything

logger = logging.getLogger(__name__)

TRAIN_SHARE = 0.8
DIGIT_SHAPE = (1, 28, 28)


@dataclass
class CanonicalModel:
    model: nn.Module
    report: dict[str, Any] = field(default_factory=dict)  # fonts, sizes, epochs, accuracies


def check_digit_dataset(data: ImageDataset) -> None:
    if data.input_shape != DIGIT_SHAPE or data.num_classes != 10:
        raise SanitizationError(
            f"canonical sanitisation renders digits (1x28x28, 10 classes); {data.name} has "
            f"{'x'.join(map(str, data.input_shape))} images and {data.num_classes} classes "
            "(use method 'self')"
        )


def train_canonical_model(
    *,
    arch: str,
    arch_kwargs: dict[str, int],
    test: ImageDataset,
    fonts_dirs: Iterable[Path] = (),
    system_fonts: bool = True,
    epochs: int,
    seed: int = 0,
    batch_size: int = 32,
) -> CanonicalModel:
    """Render every usable font's digits (augmented), train on 80%, report accuracy on the
    other 20% and on ``test`` (real digits)."""
    check_digit_dataset(test)
    fonts = find_fonts(fonts_dirs, system=system_fonts)
    rendered, _font_of = render_digits(fonts)
    order = torch.randperm(len(rendered), generator=torch.Generator().manual_seed(seed))
    cut = int(TRAIN_SHARE * len(rendered))
    train, held_out = rendered.subset(order[:cut]), rendered.subset(order[cut:])
    seed_everything(seed)
    model = fit(
        build_model(arch, **arch_kwargs),
        train.images,
        train.labels,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
    )
    report = {
        "fonts": [font.name for font in fonts],
        "font_count": len(fonts),
        "images": len(rendered),
        "train_images": len(train),
        "epochs": epochs,
        "held_out_accuracy": accuracy(model, held_out.images, held_out.labels),
        "test_data": test.name,
        "test_accuracy": accuracy(model, test.images, test.labels),
    }
    logger.info(
        "canonical model: %d fonts, %.4f on its 20%%, %.4f on %s",
        len(fonts),
        report["held_out_accuracy"],
        report["test_accuracy"],
        test.name,
    )
    return CanonicalModel(model.eval(), report)


def canonical_sanitize(
    canonical: CanonicalModel, train: ImageDataset, threshold: float
) -> np.ndarray:
    """Indices of the training images the canonical model gives confidence >= ``threshold``."""
    check_digit_dataset(train)
    return keep_confident(canonical.model, train, threshold)
