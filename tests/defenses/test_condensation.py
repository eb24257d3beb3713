"""Dataset condensation (issue 11, items 1 and 3): DC and DM lower their matching loss, a run
resumes to the very images an uninterrupted run ends with, bad settings are refused by name,
the output is an upload the training API accepts, and DM images teach more than random real
images of the same number."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from defenses.condensation import (
    CondensationConfig,
    CondensationError,
    condense,
    load_npz,
    matching_loss,
    save_grid,
    save_npz,
)
from defenses.condensation.common import class_pools, initial_images
from defenses.condensation.evaluation import evaluate_training_set, random_real_baseline
from mlcore.datasets import load_dataset

# Small, fast settings: a narrow ConvNet (the method is the same at width 128) and small pools.
QUICK = {"width": 16, "pool_per_class": 30, "batch_real": 16, "seed": 0}


@pytest.fixture(scope="module")
def train():
    return load_dataset("mnist-embedded:target-train")


@pytest.mark.parametrize(
    ("method", "iterations", "extra"),
    [("dc", 4, {"outer_loop": 5, "inner_loop": 2}), ("dm", 30, {"lr_images": 10.0})],
)
def test_condensation_decreases_its_matching_loss(train, method, iterations, extra) -> None:
    config = CondensationConfig(
        method=method, ipc=2, init="noise", iterations=iterations, **QUICK, **extra
    )
    before = initial_images(train.as_float(), class_pools(train.labels, 10, config), config)
    condensed = condense(train, config)
    # measured on fresh networks and real batches that no iteration saw
    loss_before = matching_loss(before, train, config)
    loss_after = matching_loss(condensed.images, train, config)
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    assert len(condensed.losses) == iterations


def test_a_resumed_run_ends_with_the_images_of_an_uninterrupted_one(train, tmp_path) -> None:
    config = CondensationConfig(method="dm", ipc=1, iterations=4, **QUICK)
    uninterrupted = condense(train, config)

    class Interrupted(Exception):
        pass

    def stop_after_three(done: int, _total: int, _loss: float) -> None:
        if done == 3:
            raise Interrupted

    state = tmp_path / "run.state.pt"
    with pytest.raises(Interrupted):
        condense(train, config, state_path=state, save_every=2, progress=stop_after_three)
    seen: list[int] = []
    resumed = condense(
        train, config, state_path=state, save_every=2, progress=lambda d, _t, _l: seen.append(d)
    )
    assert seen == [3, 4]  # resumed after the state saved at iteration 2
    assert torch.equal(resumed.images, uninterrupted.images)
    assert resumed.losses == uninterrupted.losses


def test_a_state_file_of_another_run_is_refused(train, tmp_path) -> None:
    state = tmp_path / "run.state.pt"
    condense(train, CondensationConfig(method="dm", ipc=1, iterations=1, **QUICK), state_path=state)
    other = CondensationConfig(method="dm", ipc=1, iterations=1, **{**QUICK, "seed": 1})
    with pytest.raises(CondensationError, match="belongs to another run"):
        condense(train, other, state_path=state)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ipc": 0}, r"ipc must be >= 1, got 0"),
        ({"ipc": 251}, r"ipc must be in 1\.\.250 .*got 251"),
        ({"ipc": 31, "pool_per_class": 30}, r"ipc must be in 1\.\.30 .*got 31"),
        ({"pool_per_class": 251}, r"pool_per_class must be in 1\.\.250 .*got 251"),
        ({"method": "kmeans"}, r"method must be one of \['dc', 'dm'\], got 'kmeans'"),
        ({"init": "zeros"}, r"init must be one of \['noise', 'real'\], got 'zeros'"),
        ({"iterations": 0}, r"iterations must be >= 1, got 0"),
        ({"lr_images": -1.0}, r"lr_images must be > 0, got -1.0"),
    ],
)
def test_bad_settings_are_refused_by_name(train, change, message) -> None:
    config = replace(CondensationConfig(method="dm", ipc=1, iterations=1), **change)
    with pytest.raises(CondensationError, match=message):
        condense(train, config)


def test_the_condensed_set_is_an_upload_and_records_its_members(train, tmp_path) -> None:
    from target_service.datasets import validate_npz

    config = CondensationConfig(method="dm", ipc=3, init="real", iterations=1, **QUICK)
    condensed = condense(train, config)
    path = save_npz(tmp_path / "dm.npz", condensed.images, condensed.labels, condensed.provenance())
    summary = validate_npz(path, classes=None, max_classes=1000, max_unpacked_bytes=10**8)
    assert (summary.n, summary.shape, summary.classes) == (30, [1, 28, 28], 10)
    images, labels = load_npz(path)
    assert torch.equal(images, condensed.images.clamp(0, 1))
    assert labels.tolist() == [c for c in range(10) for _ in range(3)]
    with np.load(path, allow_pickle=False) as npz:
        provenance = json.loads(str(npz["provenance"]))
    members = provenance["members"]
    assert members["dataset"] == "mnist-embedded:target-train"
    assert len(members["indices"]) == 10 * QUICK["pool_per_class"]
    assert members["indices"] == sorted(set(members["indices"]))
    # each class pool holds only images of that class, and real init draws from the pools
    assert torch.bincount(train.labels[members["indices"]]).tolist() == [30] * 10
    assert provenance["condensed"] | {"settings": None} == {
        "method": "dm", "ipc": 3, "init": "real", "iterations": 1, "seed": 0, "settings": None,
    }  # fmt: skip
    grid = save_grid(tmp_path / "dm.png", condensed.images, 3)
    from PIL import Image

    with Image.open(grid) as png:  # 10 rows of 3 images of 28 px, 2 px padding
        assert png.size == (3 * 30 + 2, 10 * 30 + 2)


@pytest.mark.slow
def test_dm_images_teach_more_than_random_real_images(train) -> None:
    """10 DM images per class, real-initialised, against 10 random real images per class (three
    subsets, none of them the DM starting images), LeNet-5 trained the same way on each. The
    DM run matches through a ConvNet of width 32 (the method is the same at 128) to keep the
    test under a minute on an idle machine. Measured (2026-12-02): DM 84.6% against 80.4, 80.2
    and 82.5% (mean 81.0%); the bar is the random mean + 2 points. Robust because the margin is
    against a mean over three subsets (one lucky subset moves it by a third) and because DM
    improves on its own real starting set steadily with iterations (81.1% -> 86.4% over 50
    iterations at width 128, docs/benchmarks.md), not by a one-off fluctuation; everything is
    seeded, so the figures repeat exactly on this CPU."""
    test = load_dataset("mnist-embedded:test")
    config = CondensationConfig(
        method="dm", ipc=10, init="real", iterations=DM_ITERATIONS, width=32, batch_real=64
    )
    condensed = condense(train, config)
    (dm,) = evaluate_training_set(
        condensed.images, condensed.labels, test, training_set="dm", archs=["lenet5"], epochs=200
    )
    (random,) = random_real_baseline(train, 10, test, archs=["lenet5"], seeds=[1, 2, 3], epochs=200)
    assert dm.mean > random.mean + MARGIN, (dm.accuracies, random.accuracies)


DM_ITERATIONS = 40
MARGIN = 0.02
