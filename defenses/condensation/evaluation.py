"""How good is a condensed set: fresh ConvNet and LeNet-5 models trained on it alone, and their
test accuracy, beside the papers' figures (the anchors) and a random real subset of the same
size trained the same way (the baseline that explains most "privacy for free" claims)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mlcore.architectures import arch_kwargs_for, build_model
from mlcore.datasets import ImageDataset, balanced_subset_indices
from mlcore.training import accuracy, fit

EVALUATION_ARCHS = ("convnet", "lenet5")
# Adam (lr 1e-3) full-batch steps on a small set: 300 reach a plateau on 10 images per class
# (docs/benchmarks.md); the authors trained 1,000 SGD epochs.
EVALUATION_EPOCHS = 300
EVALUATION_BATCH = 256

# MNIST test accuracy (%) of a ConvNet trained on 1 / 10 / 50 images per class.
ANCHORS: dict[str, dict[int, float]] = {
    "dc": {1: 91.7, 10: 97.4, 50: 98.8},  # Zhao, Mopuri and Bilen 2021, Table 1
    "dm": {1: 89.7, 10: 97.5, 50: 98.6},  # Zhao and Bilen 2023, Table 1
    "random": {1: 64.9, 10: 95.1, 50: 97.9},  # random real subset, DC paper Table 1
}
# The poster (papers/002): a simple CNN, about 10 images per class.
POSTER = {"condensed": 90.0, "subset": 87.0, "all data": 99.0}


@dataclass(frozen=True)
class Evaluation:
    """Test accuracy of ``arch`` models trained on one training set, one per seed."""

    arch: str
    training_set: str  # e.g. "dm ipc 10" or "random real ipc 10"
    accuracies: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def spread(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def train_small_set(
    arch: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    epochs: int = EVALUATION_EPOCHS,
    batch_size: int = EVALUATION_BATCH,
    seed: int = 0,
) -> nn.Module:
    """A fresh ``arch`` model trained on a small set (uint8 or float images in [0, 1])."""
    input_shape = (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch, **arch_kwargs_for(arch, input_shape, num_classes))
    return fit(model, images, labels, epochs=epochs, batch_size=batch_size, seed=seed)


def evaluate_training_set(
    images: torch.Tensor,
    labels: torch.Tensor,
    test: ImageDataset,
    *,
    training_set: str,
    archs: Sequence[str] = EVALUATION_ARCHS,
    seeds: Sequence[int] = (0,),
    epochs: int = EVALUATION_EPOCHS,
) -> list[Evaluation]:
    """Test accuracy on ``test`` of fresh models of each arch trained on (images, labels)."""
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    return [
        Evaluation(
            arch,
            training_set,
            tuple(
                trained_accuracy(arch, images, labels, test, epochs=epochs, seed=s) for s in seeds
            ),
        )
        for arch in archs
    ]


def trained_accuracy(
    arch: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    test: ImageDataset,
    *,
    epochs: int,
    seed: int,
) -> float:
    """Test accuracy of one fresh ``arch`` model trained on (images, labels)."""
    model = train_small_set(
        arch, images, labels, num_classes=test.num_classes, epochs=epochs, seed=seed
    )
    return accuracy(model, test.images, test.labels)


def random_real_baseline(
    train: ImageDataset,
    ipc: int,
    test: ImageDataset,
    *,
    archs: Sequence[str] = EVALUATION_ARCHS,
    seeds: Sequence[int] = (0,),
    epochs: int = EVALUATION_EPOCHS,
) -> list[Evaluation]:
    """The same evaluation on random real subsets of ``ipc`` images per class of ``train``
    (a new subset per seed, each model trained on its own)."""
    subsets = {
        seed: train.subset(
            balanced_subset_indices(train.labels, ipc * train.num_classes, seed=seed)
        )
        for seed in seeds
    }
    return [
        Evaluation(
            arch,
            f"random real ipc {ipc}",
            tuple(
                trained_accuracy(arch, s.images, s.labels, test, epochs=epochs, seed=seed)
                for seed, s in subsets.items()
            ),
        )
        for arch in archs
    ]
