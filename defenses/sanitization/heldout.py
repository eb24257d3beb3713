"""Held-out normal images: the dataset's ``test`` split, cut once (fixed seed, not the training
seed) into a calibration half, on which the detector's score threshold is set from the target
pass rate, and an evaluation half, on which a benchmark measures false rejects without reusing
the images the threshold was fitted to. Neither half was seen by the parent or the sanitised
model (the parent trains on its own training split)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defenses.sanitization.errors import SanitizationError
from mlcore.datasets import DATASETS, DatasetError, ImageDataset, load_dataset

HELD_OUT_SEED = 20011  # fixed so every run, service and benchmark agree on the two halves


@dataclass(frozen=True)
class HeldOut:
    spec: str
    calibration_indices: np.ndarray
    evaluation_indices: np.ndarray
    test: ImageDataset

    @property
    def calibration(self) -> ImageDataset:
        return self.test.subset(self.calibration_indices)

    @property
    def evaluation(self) -> ImageDataset:
        return self.test.subset(self.evaluation_indices)


def held_out_split(train_spec: str, *, data_root: Path | None = None) -> HeldOut:
    """The held-out halves for a model trained on ``train_spec`` (e.g. 'mnist-embedded:target-train')."""
    name = train_spec.partition(":")[0]
    if name not in DATASETS or "test" not in DATASETS[name].splits:
        raise SanitizationError(
            f"dataset {name!r} has no test split to hold out normal images from"
        )
    spec = f"{name}:test"
    try:
        test = load_dataset(spec, data_root=data_root)
    except DatasetError as exc:
        raise SanitizationError(str(exc)) from exc
    order = np.random.default_rng(HELD_OUT_SEED).permutation(len(test))
    half = len(test) // 2
    return HeldOut(spec, np.sort(order[:half]), np.sort(order[half:]), test)
