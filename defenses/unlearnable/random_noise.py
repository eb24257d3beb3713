"""Random class-wise noise, the trivial baseline: one pattern per class drawn uniformly from
[-eps, eps] (seeded), added to every image of the class. It has the budget of class-wise
error-minimising noise but no optimisation, so the gap between the two is what the optimisation
buys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from defenses.unlearnable.base import (
    Progress,
    ProtectionResult,
    UnlearnableError,
    check_eps,
    check_images,
    check_labels,
    coarse_shape,
    coarse_to_full,
    project,
    require_labels,
)


def protect_random(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    eps: float,
    seed: int,
    progress: Progress | None = None,
    resume_path: Path | None = None,
    block: int = 1,
    **options: Any,
) -> ProtectionResult:
    """One uniform pattern per class, one value per ``block`` x ``block`` square (as the
    crafted methods' ``block``); nothing to resume (it takes milliseconds)."""
    if options:
        raise UnlearnableError(f"random takes only the option 'block', got {sorted(options)}")
    eps = check_eps(eps)
    images = check_images(images)
    labels = require_labels(check_labels(labels, len(images)), "random")
    generator = torch.Generator().manual_seed(seed)
    classes = int(labels.max()) + 1
    shape = coarse_shape(images.shape[1:], block)
    patterns = (torch.rand(classes, *shape, generator=generator) * 2 - 1) * eps
    patterns = coarse_to_full(patterns, size=tuple(images.shape[2:]))
    noise = project(images, patterns[labels], eps)
    if progress is not None:
        progress(1, 1, "drawn")
    info = {"method": "random", "eps": eps, "seed": seed, "rounds": 0, "block": block}
    return ProtectionResult(images + noise, labels.clone(), noise, info)
