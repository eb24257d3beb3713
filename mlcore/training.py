"""Fit and evaluate loops shared by the target's trainer and the attacker's substitute.

The DRMI paper's settings are the defaults: Adam, learning rate 1e-3, cross-entropy. Runs are
deterministic for a given seed on the CPU (seeded init and a seeded shuffle).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]  # (epoch, epochs, mean loss of that epoch)


def as_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]; float images pass through unchanged."""
    return images.float().div(255.0) if images.dtype == torch.uint8 else images.float()


def fit(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Progress | None = None,
) -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy; returns it in eval mode."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images (>0), got {len(images)} and {len(labels)}")
    inputs, targets = as_model_input(images), labels.long()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        mean_loss = train_epoch(
            model, optimizer, inputs, targets, batch_size=batch_size, generator=generator
        )
        logger.debug("epoch %d/%d loss %.4f", epoch + 1, epochs, mean_loss)
        if progress is not None:
            progress(epoch + 1, epochs, mean_loss)
    return model.eval()


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    """One pass over ``inputs`` (float, model-ready) in an order drawn from ``generator``;
    returns the mean cross-entropy. Resumable training saves the optimizer's and the generator's
    state between epochs, so a resumed run draws the same batches as an uninterrupted one."""
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    order = torch.randperm(len(inputs), generator=generator)
    total = 0.0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        optimizer.zero_grad()
        loss = loss_fn(model(inputs[batch]), targets[batch])
        loss.backward()
        optimizer.step()
        total += loss.item() * len(batch)
    return total / len(order)


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, *, batch_size: int = 1000
) -> torch.Tensor:
    model.eval()
    inputs = as_model_input(images)
    return torch.cat([model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


def predict_labels(
    model: nn.Module, images: torch.Tensor, *, batch_size: int = 1000
) -> torch.Tensor:
    return predict_logits(model, images, batch_size=batch_size).argmax(dim=1)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``images`` whose predicted label equals ``labels``."""
    return (predict_labels(model, images) == labels).float().mean().item()


def agreement(model: nn.Module, other: nn.Module, images: torch.Tensor) -> float:
    """Share of ``images`` on which two models predict the same label (fidelity)."""
    return (predict_labels(model, images) == predict_labels(other, images)).float().mean().item()


def seed_everything(seed: int) -> None:
    """Seed torch's global generator so that model initialisation is reproducible."""
    torch.manual_seed(seed)
