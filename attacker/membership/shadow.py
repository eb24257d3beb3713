"""Shadow models (Shokri et al. 2017), with the attack classifier of ML-Doctor (Liu et al. 2022).

The attacker trains ``k`` shadow models on random subsets (halves by default) of its own pool (``train_shadows``,
shared with LiRA), so it knows which images each shadow saw. Each shadow's posteriors on its
"in" and "out" halves, sorted in descending order, plus whether the top class is the true label,
train one attack classifier (an sklearn MLP); the target's posteriors on the candidates (one
probability query each) are then scored by that classifier. Shadows are trained like the
hosted targets (Adam, cross-entropy) and their posteriors rounded as the target's policy rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from sklearn.neural_network import MLPClassifier
from torch import nn

from attacker.membership.base import MembershipAttack
from attacker.oracle import ProbabilityOracle
from mlcore.architectures import ARCHITECTURES, build_model
from mlcore.datasets import load_dataset
from mlcore.divergences import log_probabilities
from mlcore.training import fit, predict_logits, seed_everything

ShadowProgress = Callable[[int, int], None]  # (shadows trained, shadows in all)


@dataclass(frozen=True)
class Shadow:
    """A shadow model and which pool images it was trained on."""

    model: nn.Module
    trained_on: np.ndarray  # bool mask over the pool


@dataclass
class ShadowSettings:
    """How shadow models are trained; shared by the shadow-model attack and LiRA."""

    pool: str = "mnist-embedded:pool"
    shadows: int = 4
    size: int | None = None  # images each shadow trains on; default half the pool
    arch: str = "lenet5"
    epochs: int = 15
    batch_size: int = 32
    seed: int = 0
    decimals: int | None = None  # round shadow posteriors like a probabilities:DECIMALS target
    data_root: Path | None = None

    def check(self) -> None:
        if self.shadows < 1:
            raise ValueError(f"shadows must be >= 1, got {self.shadows}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"size must be >= 1 (images per shadow), got {self.size}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {self.arch!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.decimals is not None and not 0 <= self.decimals <= 6:
            raise ValueError(f"decimals must be in 0..6 (or None), got {self.decimals}")


def train_shadows(
    settings: ShadowSettings,
    *,
    image_shape: tuple[int, ...],
    progress: ShadowProgress | None = None,
) -> tuple[list[Shadow], torch.Tensor, torch.Tensor]:
    """``settings.shadows`` models, each on a seeded random ``size`` images of the pool (half by
    default); returns them with the pool's images and labels. Costs no query."""
    pool = load_dataset(settings.pool, data_root=settings.data_root)
    if tuple(pool.input_shape) != tuple(image_shape):
        raise ValueError(
            f"the shadow pool {settings.pool} holds images of shape {list(pool.input_shape)}, "
            f"the candidates {list(image_shape)}"
        )
    size = len(pool) // 2 if settings.size is None else settings.size
    if not 1 <= size < len(pool):
        raise ValueError(
            f"size must be in 1..{len(pool) - 1} (the pool {settings.pool} holds {len(pool)}), "
            f"got {size}"
        )
    rng = np.random.default_rng(settings.seed)
    shadows = []
    for index in range(settings.shadows):
        trained_on = np.zeros(len(pool), dtype=bool)
        trained_on[rng.permutation(len(pool))[:size]] = True
        seed = settings.seed * 1000 + index
        seed_everything(seed)
        model = build_model(
            settings.arch, in_channels=pool.input_shape[0], num_classes=pool.num_classes
        )
        chosen = torch.from_numpy(np.flatnonzero(trained_on))
        fit(
            model,
            pool.images[chosen],
            pool.labels[chosen],
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            seed=seed,
        )
        shadows.append(Shadow(model, trained_on))
        if progress is not None:
            progress(index + 1, settings.shadows)
    return shadows, pool.images, pool.labels


def shadow_probabilities(
    shadow: Shadow, images: torch.Tensor | np.ndarray, decimals: int | None
) -> np.ndarray:
    """A shadow's float64 probabilities, rounded as the target's policy rounds."""
    logits = predict_logits(shadow.model, torch.tensor(np.asarray(images)))  # a copy: writable
    probabilities = log_probabilities(logits).exp().numpy()
    return probabilities if decimals is None else probabilities.round(decimals)


def attack_features(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ML-Doctor's features: the posterior sorted in descending order, and correctness."""
    ranked = -np.sort(-probabilities, axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    return np.column_stack([ranked, correct])


@dataclass
class ShadowModelAttack(MembershipAttack):
    name: ClassVar[str] = "shadow"
    needs_probabilities: ClassVar[bool] = True
    shadow: ShadowSettings = field(default_factory=ShadowSettings)
    hidden: int = 64  # the attack MLP's hidden units

    def __post_init__(self) -> None:
        self.shadow.check()
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")

    def _scores(
        self, oracle: ProbabilityOracle, images: np.ndarray, labels: np.ndarray
    ) -> np.ndarray:
        shadows, pool_images, pool_labels = train_shadows(self.shadow, image_shape=images.shape[1:])
        features, membership = [], []
        for shadow in shadows:
            probabilities = shadow_probabilities(shadow, pool_images, self.shadow.decimals)
            features.append(attack_features(probabilities, pool_labels.numpy()))
            membership.append(shadow.trained_on)
        classifier = MLPClassifier(
            hidden_layer_sizes=(self.hidden,), max_iter=500, random_state=self.shadow.seed
        )
        classifier.fit(np.concatenate(features), np.concatenate(membership))
        target = oracle.predict_probabilities(images)
        return classifier.predict_proba(attack_features(target, labels))[:, 1]
