"""Model extraction: buy labels for the selected pool images, train a substitute on them.

The attacker never sees the target's weights: it knows its own pool, the labels it bought and a
test set. The DRMI paper's training settings are the defaults (Adam 1e-3, batch 4 on MNIST).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from attacker.oracle import LabelOracle, buy
from mlcore.architectures import build_model
from mlcore.datasets import ImageDataset
from mlcore.training import Progress, accuracy, fit, predict_labels, seed_everything

logger = logging.getLogger(__name__)


@dataclass
class ExtractionResult:
    substitute: nn.Module
    arch: str
    arch_kwargs: dict[str, int]
    indices: np.ndarray  # pool indices actually used for training
    labels: np.ndarray  # the labels bought for them
    queries_bought: int
    train_seconds: float
    # "budget" (402) or "blocked" (403) when the service stopped the purchase part-way (the
    # labels bought until then are kept and trained on); None when every label was bought
    stopped_by: str | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)


def buy_labels(
    oracle: LabelOracle, pool: ImageDataset, indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Labels for ``pool[indices]``: (indices bought, their labels, what stopped the purchase)."""
    purchase = buy(oracle, pool.images[torch.as_tensor(indices)].numpy())
    bought = purchase.bought
    if purchase.stopped_by is not None:
        logger.warning("training on the %d labels bought", int(bought.sum()))
    return indices[bought], purchase.labels[bought], purchase.stopped_by


def train_substitute(
    pool: ImageDataset,
    indices: np.ndarray,
    labels: np.ndarray,
    *,
    arch: str = "lenet5",
    epochs: int = 30,
    batch_size: int = 4,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[nn.Module, dict[str, int], float]:
    """Fit a fresh ``arch`` on the bought labels; returns (model, arch_kwargs, seconds)."""
    if len(indices) == 0:
        raise ValueError("no labelled images to train a substitute on")
    arch_kwargs = {"in_channels": pool.input_shape[0], "num_classes": pool.num_classes}
    seed_everything(seed)
    model = build_model(arch, **arch_kwargs)
    started = time.perf_counter()
    images = pool.images[torch.as_tensor(indices)]
    fit(
        model,
        images,
        torch.as_tensor(labels),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        progress=progress,
    )
    return model, arch_kwargs, time.perf_counter() - started


def train_on_bought(
    pool: ImageDataset,
    indices: np.ndarray,
    labels: np.ndarray,
    *,
    semi_supervised: bool = False,
    arch: str = "lenet5",
    epochs: int = 30,
    batch_size: int = 4,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[nn.Module, dict[str, int], float]:
    """The substitute of any strategy that bought pool images: on the bought labels alone, or
    (``semi_supervised``) on them plus the unlabeled rest of the pool (FixMatch, which draws its
    own batches: ``batch_size`` is unused then)."""
    if semi_supervised:
        from attacker.semi_supervised import train_semi_supervised

        return train_semi_supervised(
            pool, indices, labels, arch=arch, epochs=epochs, seed=seed, progress=progress
        )
    return train_substitute(
        pool, indices, labels, arch=arch, epochs=epochs, batch_size=batch_size, seed=seed,
        progress=progress,
    )  # fmt: skip


def extract(
    oracle: LabelOracle,
    pool: ImageDataset,
    indices: np.ndarray,
    *,
    arch: str = "lenet5",
    epochs: int = 30,
    batch_size: int = 4,
    seed: int = 0,
    semi_supervised: bool = False,
    progress: Progress | None = None,
) -> ExtractionResult:
    """Buy labels for ``pool[indices]`` from ``oracle`` and train a substitute on them (and, when
    ``semi_supervised``, on the unlabeled rest of the pool: ``attacker.semi_supervised``)."""
    indices = np.asarray(indices, dtype=np.int64)
    used, labels, stopped_by = buy_labels(oracle, pool, indices)
    model, arch_kwargs, seconds = train_on_bought(
        pool, used, labels, semi_supervised=semi_supervised, arch=arch, epochs=epochs,
        batch_size=batch_size, seed=seed, progress=progress,
    )  # fmt: skip
    return ExtractionResult(model, arch, arch_kwargs, used, labels, len(used), seconds, stopped_by)


def evaluate_substitute(
    substitute: nn.Module, test: ImageDataset, *, target_labels: np.ndarray | None = None
) -> dict[str, float | None]:
    """Test accuracy (true labels) and agreement with the target's labels when they are known."""
    result: dict[str, float | None] = {
        "substitute_accuracy": accuracy(substitute, test.images, test.labels)
    }
    if target_labels is None:
        result["agreement"] = None
    else:
        predicted = predict_labels(substitute, test.images).numpy()
        result["agreement"] = float((predicted == np.asarray(target_labels)).mean())
    return result
