"""How well a model learns from protected images: train a fresh model on them (the trainer's
side, mlcore.training's Adam loop) and measure its accuracy on clean test images, beside the same
model trained on the clean images."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlcore.architectures import arch_kwargs_for, build_model
from mlcore.training import accuracy, fit, seed_everything


@dataclass(frozen=True)
class TrainedAccuracy:
    training_set: str  # "clean" or "protected"
    arch: str
    seed: int
    test_accuracy: float


def clean_test_accuracy(
    images: torch.Tensor,
    labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    arch: str = "lenet5",
    epochs: int = 10,
    seed: int = 0,
    num_classes: int = 10,
) -> float:
    """Accuracy on the clean test images of a fresh ``arch`` trained on ``images`` (seeded)."""
    seed_everything(seed)
    model = build_model(arch, **arch_kwargs_for(arch, tuple(images.shape[1:]), num_classes))  # type: ignore[arg-type]
    fit(model, images, labels, epochs=epochs, seed=seed)
    return accuracy(model, test_images, test_labels)


def compare_clean_and_protected(
    clean: torch.Tensor,
    protected: torch.Tensor,
    labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    arch: str = "lenet5",
    epochs: int = 10,
    seeds: tuple[int, ...] = (0,),
    num_classes: int = 10,
) -> list[TrainedAccuracy]:
    """Clean-test accuracy of fresh models trained on the clean and on the protected images,
    one per seed and training set (the same seeds for both, so only the data differs)."""
    rows = []
    for seed in seeds:
        for name, images in (("clean", clean), ("protected", protected)):
            score = clean_test_accuracy(
                images,
                labels,
                test_images,
                test_labels,
                arch=arch,
                epochs=epochs,
                seed=seed,
                num_classes=num_classes,
            )
            rows.append(TrainedAccuracy(name, arch, seed, score))
    return rows
