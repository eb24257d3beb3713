"""What a hosted model is trained on when it is not its whole training split: a condensed
version of the split (DC or DM, ``defenses.condensation``) or a seeded random real subset of it,
and the members that leaves in its checkpoint.

Derived targets are named after a base target (``TARGETS`` in ``zoo.py``):
``<base>-<dm|dc><ipc>-<noise|real>`` (e.g. ``lenet5-mnist-dm10-noise``) and
``<base>-subset<n>`` (e.g. ``lenet5-mnist-subset100``); such names may go in ``TARGET_MODELS``
and ``target-service train --model``. The members contract (read by the membership challenges):
``provenance["members"] = {"dataset": "<name:split>", "indices": [ascending ints]}``, for a
condensed set every real image the condensation could draw on, plus ``provenance["condensed"]``.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from defenses.condensation import CondensationConfig, condense
from mlcore.datasets import ImageDataset, balanced_subset_indices

logger = logging.getLogger(__name__)

DERIVED_NAME = re.compile(
    r"^(?P<base>.+?)-(?:(?P<method>dc|dm)(?P<ipc>[0-9]+)-(?P<init>noise|real)|subset(?P<n>[0-9]+))$"
)


@dataclass(frozen=True)
class Derivation:
    """How a derived target's training set comes from its base target's split."""

    base: str
    condensation: CondensationConfig | None = None
    member_count: int | None = None


def derived_name(
    base: str,
    *,
    method: str | None = None,
    ipc: int = 10,
    init: str = "noise",
    member_count: int | None = None,
) -> str:
    """The name of ``base`` trained on a condensed set or on a subset of ``member_count``."""
    if method is not None:
        return f"{base}-{method}{ipc}-{init}"
    if member_count is not None:
        return f"{base}-subset{member_count}"
    return base


def parse_derived(name: str) -> Derivation | None:
    """The derivation a target name spells, or None for a plain name."""
    match = DERIVED_NAME.match(name)
    if match is None:
        return None
    if match["n"] is not None:
        return Derivation(match["base"], member_count=int(match["n"]))
    config = CondensationConfig(method=match["method"], ipc=int(match["ipc"]), init=match["init"])  # type: ignore[arg-type]
    return Derivation(match["base"], condensation=config)


@dataclass(frozen=True)
class TrainingSet:
    images: torch.Tensor  # uint8, or float32 in [0, 1] for a condensed set
    labels: torch.Tensor
    provenance: dict[str, Any]


def training_set(
    train: ImageDataset,
    *,
    condensation: CondensationConfig | None = None,
    member_count: int | None = None,
    seed: int = 0,
) -> TrainingSet:
    """The images a target is trained on, and the provenance recording its members: the
    condensation of ``train``, a class-balanced random subset of ``member_count`` of its images
    (seeded), or all of it (no provenance: the whole split is the members)."""
    if condensation is not None:
        condensed = condense(train, condensation)
        logger.info(
            "condensed %s by %s to %d images in %.0f s",
            train.name, condensation.method, len(condensed.labels), condensed.seconds,
        )  # fmt: skip
        return TrainingSet(condensed.images, condensed.labels, condensed.provenance())
    if member_count is not None:
        indices = balanced_subset_indices(train.labels, member_count, seed=seed)
        subset = train.subset(indices)
        members = {"dataset": train.name, "indices": [int(i) for i in indices]}
        return TrainingSet(subset.images, subset.labels, {"members": members})
    return TrainingSet(train.images, train.labels, {})


def scaled_epochs(epochs: int, full_size: int, used_size: int) -> int:
    """Epochs on a smaller training set that make as many optimiser steps as ``epochs`` on the
    full split (a 100-image set would otherwise get a few dozen steps and learn nothing)."""
    return max(epochs, math.ceil(epochs * full_size / used_size))
