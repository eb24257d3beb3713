"""Semi-supervised extraction: train the substitute on the bought labels *and* the unlabeled
rest of the attacker's pool (Jagielski et al. 2020 showed this is what makes label-only
extraction query-efficient).

The method is FixMatch (Sohn et al., NeurIPS 2020): each step takes a batch of bought labels
(cross-entropy on a weakly augmented view) and a batch of unlabeled pool images; the model's
prediction on a weak view of an unlabeled image becomes its pseudo-label when its confidence is
at least ``threshold``, and the model is trained to predict that label on a strongly augmented
view of the same image. Unconfident images are masked out, so early, poor predictions do not
teach the model its own mistakes.

Augmentations are made for digits: small shifts (weak), and rotation, shear, scaling, shifts,
contrast and a cut-out square (strong). No flips: a mirrored 2 or 7 is not a 2 or a 7.

It works with any selector: it only needs which pool images were bought and their labels.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlcore.architectures import build_model
from mlcore.datasets import ImageDataset
from mlcore.training import Progress, as_model_input, seed_everything

logger = logging.getLogger(__name__)

__all__ = ["STEPS_PER_EPOCH", "train_semi_supervised"]

STEPS_PER_EPOCH = (
    32  # an "epoch" is a fixed number of steps, so its cost does not grow with the pool
)


def train_semi_supervised(
    pool: ImageDataset,
    indices: np.ndarray,
    labels: np.ndarray,
    *,
    arch: str = "lenet5",
    epochs: int = 30,
    labelled_batch: int = 16,
    unlabeled_batch: int = 64,
    lr: float = 1e-3,
    threshold: float = 0.95,
    unlabeled_weight: float = 1.0,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[nn.Module, dict[str, int], float]:
    """Fit a fresh ``arch`` on ``pool[indices]`` labelled ``labels`` plus every other pool image,
    unlabeled; returns (model, arch_kwargs, seconds), as ``extraction.train_substitute`` does.

    ``epochs`` x ``STEPS_PER_EPOCH`` steps of Adam; ``unlabeled_weight`` 0 trains on the labels
    alone (with the same augmentation), the ablation that isolates what the unlabeled pool adds.
    """
    indices = np.asarray(indices, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(indices) == 0:
        raise ValueError("no labelled images to train a substitute on")
    if len(indices) != len(labels):
        raise ValueError(f"need one label per index, got {len(indices)} and {len(labels)}")
    for name, value in (("epochs", epochs), ("labelled_batch", labelled_batch)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if unlabeled_batch < 1:
        raise ValueError(f"unlabeled_batch must be >= 1, got {unlabeled_batch}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if not (math.isfinite(unlabeled_weight) and unlabeled_weight >= 0.0):
        raise ValueError(f"unlabeled_weight must be a finite number >= 0, got {unlabeled_weight}")

    arch_kwargs = {"in_channels": pool.input_shape[0], "num_classes": pool.num_classes}
    seed_everything(seed)
    model = build_model(arch, **arch_kwargs)
    generator = torch.Generator().manual_seed(seed)
    inputs = as_model_input(pool.images)
    unlabeled = np.setdiff1d(np.arange(len(pool)), indices)
    labelled_x, labelled_y = inputs[torch.as_tensor(indices)], torch.as_tensor(labels)
    unlabeled_x = inputs[torch.as_tensor(unlabeled)]
    use_pool = unlabeled_weight > 0 and len(unlabeled) > 0
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    started = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        total, masked_in = 0.0, 0.0
        for _ in range(STEPS_PER_EPOCH):
            pick = torch.randint(len(labelled_x), (labelled_batch,), generator=generator)
            loss = F.cross_entropy(model(weak(labelled_x[pick], generator)), labelled_y[pick])
            if use_pool:
                pick = torch.randint(len(unlabeled_x), (unlabeled_batch,), generator=generator)
                batch = unlabeled_x[pick]
                with torch.no_grad():
                    confidence, pseudo = model(weak(batch, generator)).softmax(dim=1).max(dim=1)
                mask = (confidence >= threshold).float()
                per_image = F.cross_entropy(
                    model(strong(batch, generator)), pseudo, reduction="none"
                )
                loss = loss + unlabeled_weight * (mask * per_image).mean()
                masked_in += mask.mean().item()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        mean_loss = total / STEPS_PER_EPOCH
        logger.debug(
            "semi-supervised epoch %d/%d loss %.4f, %.0f%% of unlabeled images pseudo-labelled",
            epoch + 1, epochs, mean_loss, 100 * masked_in / STEPS_PER_EPOCH,
        )  # fmt: skip
        if progress is not None:
            progress(epoch + 1, epochs, mean_loss)
    return model.eval(), arch_kwargs, time.perf_counter() - started


def weak(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A shift of up to 2 pixels each way: the label surely survives it."""
    n, _, height, _ = images.shape
    shift = _uniform(generator, (n, 2), 2 * 2.0 / height)
    return _warp(images, torch.eye(2).expand(n, 2, 2), shift)


def strong(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rotation (+-25 degrees), shear, scaling (0.8-1.2), shifts (+-4 pixels), contrast
    (0.5-1.0) and a black 10x10 cut-out: different enough that agreeing with the weak view's
    label teaches the model something, while a person would still read the same digit."""
    n, _, height, width = images.shape
    angle = _uniform(generator, (n,), math.radians(25))
    shear = _uniform(generator, (n,), 0.3)
    scale = 1.0 + _uniform(generator, (n,), 0.2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    linear = torch.stack(
        [torch.stack([cos, -sin + shear], 1), torch.stack([sin, cos], 1)], 1
    ) / scale.view(n, 1, 1)
    warped = _warp(images, linear, _uniform(generator, (n, 2), 2 * 4.0 / height))
    contrast = 0.75 + _uniform(generator, (n, 1, 1, 1), 0.25)
    warped = warped * contrast
    size = 10
    top = torch.randint(0, height - size + 1, (n,), generator=generator)
    left = torch.randint(0, width - size + 1, (n,), generator=generator)
    rows = torch.arange(height).view(1, height, 1)
    cols = torch.arange(width).view(1, 1, width)
    hole = (
        (rows >= top.view(n, 1, 1))
        & (rows < (top + size).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < (left + size).view(n, 1, 1))
    )
    return warped.masked_fill(hole.unsqueeze(1), 0.0)


def _uniform(generator: torch.Generator, shape: tuple[int, ...], bound: float) -> torch.Tensor:
    """Uniform in [-bound, bound]."""
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def _warp(images: torch.Tensor, linear: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """One affine warp per image (torch's affine_grid + grid_sample); zeros come in at edges."""
    theta = torch.cat([linear, shift.unsqueeze(2)], dim=2)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)
