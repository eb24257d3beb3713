"""A small parent (LeNet-5, 4 epochs on the embedded MNIST target-train split, about 95% test
accuracy) and its self-sanitised twin at threshold 0.9 trained as long as its parent, built once per session
(seconds each)."""

from __future__ import annotations

from pathlib import Path

import pytest

from defenses.sanitization import SanitizedPair, build_sanitized_pair, load_sanitized_pair
from mlcore.architectures import build_model
from mlcore.checkpoints import save_checkpoint
from mlcore.datasets import load_dataset
from mlcore.training import fit, seed_everything

SELF_THRESHOLD = 0.9
PARENT_EPOCHS = 4
TRAIN_DATA = "mnist-embedded:target-train"


@pytest.fixture(scope="session")
def parent_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    train = load_dataset(TRAIN_DATA)
    seed_everything(0)
    model = fit(
        build_model("lenet5"), train.images, train.labels, epochs=PARENT_EPOCHS, batch_size=32
    )
    return save_checkpoint(
        tmp_path_factory.mktemp("parent") / "lenet5-mnist.pt",
        model,
        arch="lenet5",
        arch_kwargs={"in_channels": 1, "num_classes": 10},
        dataset=TRAIN_DATA,
        metrics={"epochs": PARENT_EPOCHS},
    )


@pytest.fixture(scope="session")
def self_pair_path(parent_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sanitized") / "lenet5-mnist.sanitized-self.pt"
    build_sanitized_pair(parent_path, method="self", threshold=SELF_THRESHOLD, out_path=out)
    return out


@pytest.fixture(scope="session")
def self_pair(self_pair_path: Path, parent_path: Path) -> SanitizedPair:
    return load_sanitized_pair(self_pair_path, parent_path)
