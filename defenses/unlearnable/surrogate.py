"""Surrogate models for the unlearnable-noise methods: penultimate features, and a surrogate
trained on a source other than the images being protected.

Unlearnable Clusters needs a feature extractor that never saw the owner's images (the paper used
ImageNet or CLIP weights; neither can be had here), so the surrogate is an architecture of
``mlcore`` trained with ``mlcore.training.fit`` on another dataset of the registry: scikit-learn's
digits (``digits-embedded:pool``), USPS (``usps:pool``, needs a data root) or a split of MNIST
disjoint from the one protected. It reports its source and its accuracy on a held-out part of it.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from defenses.unlearnable.base import UnlearnableError
from mlcore.architectures import arch_kwargs_for, build_model
from mlcore.datasets import load_dataset
from mlcore.training import accuracy, fit, seed_everything

DEFAULT_SOURCE = "digits-embedded:pool"


def feature_extractor(model: nn.Module) -> nn.Module:
    """The model without its last linear layer: input -> penultimate features.

    Sequential models (LeNet-5, C3F2, DNN5, the ConvNet) drop their last layer; ResNet-18 gets an
    identity head. The returned module shares the model's weights."""
    if isinstance(model, nn.Sequential):
        return model[:-1]
    if isinstance(getattr(model, "fc", None), nn.Linear):
        headless = copy.copy(model)  # shallow: same submodules, same weights
        headless.fc = nn.Identity()
        return headless
    raise UnlearnableError(f"cannot find the penultimate layer of a {type(model).__name__}")


@torch.no_grad()
def penultimate_features(
    model: nn.Module, images: torch.Tensor, *, batch_size: int = 1000
) -> torch.Tensor:
    """Penultimate features of float images in [0, 1], in eval mode, batched."""
    extractor = feature_extractor(model).eval()
    return torch.cat(
        [extractor(images[i : i + batch_size].float()) for i in range(0, len(images), batch_size)]
    )


def check_surrogate_fits(model: nn.Module, images: torch.Tensor) -> None:
    """Raise ValueError unless the surrogate accepts images of this shape (one forward pass)."""
    try:
        with torch.no_grad():
            feature_extractor(model).eval()(images[:2].float())
    except RuntimeError as exc:
        raise UnlearnableError(
            f"the surrogate does not fit images of shape {list(images.shape[1:])}: {str(exc)[:200]}"
        ) from None


def train_surrogate(
    source: str = DEFAULT_SOURCE,
    *,
    input_shape: tuple[int, ...],
    arch: str = "lenet5",
    epochs: int = 20,
    seed: int = 0,
    data_root: str | None = None,
    heldout_share: float = 0.2,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``arch`` on ``source`` (a dataset spec) minus a seeded held-out share, and say which
    source it was and how accurate it is on the held-out part."""
    data = load_dataset(source, data_root=data_root)
    if tuple(data.input_shape) != tuple(input_shape):
        raise UnlearnableError(
            f"surrogate source {source} has images of shape {list(data.input_shape)}, "
            f"the images to protect are {list(input_shape)}"
        )
    order = np.random.default_rng(seed).permutation(len(data))
    heldout = int(len(data) * heldout_share)
    train, test = data.subset(order[heldout:]), data.subset(order[:heldout])
    seed_everything(seed)
    model = build_model(arch, **arch_kwargs_for(arch, data.input_shape, data.num_classes))
    fit(model, train.images, train.labels, epochs=epochs, seed=seed)
    info = {
        "source": source,
        "arch": arch,
        "epochs": epochs,
        "train_images": len(train),
        "heldout_accuracy": accuracy(model, test.images, test.labels) if heldout else None,
    }
    return model, info
