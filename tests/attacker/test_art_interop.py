"""The ART adapter: one-hot rows that match each image's own label in mixed batches (where ART's
own label-only postprocessor goes wrong), one paid query per image, and bad input named.
ART comes with the dev extras (``.[dev]`` includes ``[art]``), so these run, never skip, in CI."""

from __future__ import annotations

import numpy as np
import pytest

from attacker.art_interop import art_substitute, art_victim, one_hot_labels
from attacker.oracle import Meter


class BrightnessOracle:
    """Label = the image's brightest pixel value mod 10: each image its own, known label."""

    def __init__(self) -> None:
        self.meter = Meter()
        self.queries_remaining: int | None = None
        self.seen: list[np.ndarray] = []

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        assert images.dtype == np.uint8  # what the service accepts
        self.seen.append(images)
        self.meter.paid += len(images)
        return images.reshape(len(images), -1).max(axis=1).astype(np.int64) % 10


def images_with_labels(labels: list[int]) -> np.ndarray:
    x = np.zeros((len(labels), 1, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        x[i, 0, i % 28, 3] = 200 + label  # 200..209: label = value mod 10
    return x


def test_mixed_prediction_batches_get_each_images_own_one_hot_row() -> None:
    labels = [3, 7, 3, 0, 9, 1, 1, 4]
    x = images_with_labels(labels).astype(np.float32) / 255.0
    oracle = BrightnessOracle()
    victim = art_victim(oracle, input_shape=(1, 28, 28), nb_classes=10)
    rows = victim.predict(x, batch_size=5)  # two batches, each with mixed labels
    assert rows.shape == (8, 10) and set(np.unique(rows)) == {0.0, 1.0}
    assert rows.sum(axis=1).tolist() == [1.0] * 8
    assert rows.argmax(axis=1).tolist() == labels
    assert oracle.meter.paid == 8 and [len(b) for b in oracle.seen] == [5, 3]
    assert np.array_equal(np.concatenate(oracle.seen), images_with_labels(labels))  # exact bytes


def test_arts_own_label_postprocessor_is_wrong_on_the_same_batch() -> None:
    """Why the adapter builds its rows itself: this fails once ART fixes ClassLabels."""
    from art.defences.postprocessor import ClassLabels

    scores = np.eye(10, dtype=np.float32)[[3, 7]]
    assert ClassLabels()(scores).sum(axis=1).tolist() == [2.0, 2.0]  # both classes in both rows


def test_withheld_labels_are_zero_rows_and_bad_inputs_are_named() -> None:
    class Withholding(BrightnessOracle):
        def predict_labels(self, images: np.ndarray) -> np.ndarray:
            labels = super().predict_labels(images)
            labels[0] = -1
            return labels

    rows = one_hot_labels(Withholding(), images_with_labels([2, 5]) / 255.0, nb_classes=10)
    assert rows.sum(axis=1).tolist() == [0.0, 1.0] and rows[1, 5] == 1.0
    with pytest.raises(ValueError, match=r"finite pixel values in \[0, 1\]"):
        one_hot_labels(BrightnessOracle(), np.full((1, 1, 28, 28), 2.0), nb_classes=10)
    with pytest.raises(ValueError, match="label 9 but nb_classes=5"):
        one_hot_labels(BrightnessOracle(), images_with_labels([9]) / 255.0, nb_classes=5)
    with pytest.raises(ValueError, match="nb_classes must be >= 2, got 1"):
        art_victim(BrightnessOracle(), input_shape=(1, 28, 28), nb_classes=1)


def test_the_substitute_is_our_architecture_behind_arts_interface() -> None:
    thief = art_substitute("lenet5", seed=0)
    again = art_substitute("lenet5", seed=0)
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    assert thief.predict(x).shape == (4, 10)
    assert np.array_equal(thief.predict(x), again.predict(x))  # seeded initialisation
