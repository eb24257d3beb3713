"""Unlearnable examples (issue 12, data-owner side): every registered method keeps its noise
within eps and its images in [0, 1]; class-wise noise is one pattern per class; bad eps, images
and label-less pools are refused by name; an interrupted run resumes to the very noise an
uninterrupted one reaches; and LeNet-5 learns far less from class-wise error-minimising data."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from defenses.unlearnable import METHODS, check_eps, project
from defenses.unlearnable.base import UnlearnableError, check_images
from defenses.unlearnable.evaluation import clean_test_accuracy
from mlcore.datasets import balanced_subset_indices, load_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EPS = 16 / 255
# Options that keep a method to a second or two on 100 images (methods not named run with their
# defaults; add a line here when a method's defaults are slow).
FAST_OPTIONS: dict[str, dict[str, Any]] = {
    "em-classwise": {"max_rounds": 2, "train_steps": 2, "pgd_steps": 2},
    "em-samplewise": {"max_rounds": 2, "train_steps": 2, "pgd_steps": 2},
    "mi-ue": {"rounds": 2, "noise_steps": 2},
    "uc": {"clusters": 4, "surrogate_epochs": 1, "steps": 5},
}
CLASSWISE = ("em-classwise", "random")


def small_pool(per_class: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    pool = load_dataset("mnist-embedded:pool")
    index = balanced_subset_indices(pool.labels, 10 * per_class, seed=0)
    return pool.as_float()[index], pool.labels[index]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_keeps_noise_within_eps_and_images_in_range(name: str) -> None:
    images, labels = small_pool()
    result = METHODS[name](images, labels, eps=EPS, seed=0, **FAST_OPTIONS.get(name, {}))
    assert result.images.shape == images.shape and result.images.dtype == torch.float32
    assert result.noise.abs().max() <= EPS + 1e-6
    assert result.noise.abs().max() > EPS / 2  # the budget is used, not left at zero
    assert result.images.min() >= 0 and result.images.max() <= 1
    assert torch.allclose(result.images, images + result.noise, atol=1e-6)
    assert torch.equal(result.labels, labels)
    assert result.info["method"] == name and math.isclose(result.info["eps"], EPS)


@pytest.mark.parametrize("name", CLASSWISE)
def test_classwise_noise_is_one_pattern_per_class(name: str) -> None:
    """Wherever the [0, 1] clip did not cut it, an image's noise is its class's pattern: at
    every pixel, the unclipped values of one class agree, and two classes' patterns differ."""
    images, labels = small_pool()
    result = METHODS[name](images, labels, eps=EPS, seed=0, **FAST_OPTIONS.get(name, {}))
    unclipped = (result.images > 0) & (result.images < 1)
    patterns = []
    for cls in range(10):
        noise, free = result.noise[labels == cls], unclipped[labels == cls]
        high = torch.where(free, noise, -math.inf).amax(dim=0)
        low = torch.where(free, noise, math.inf).amin(dim=0)
        seen = free.any(dim=0)
        assert seen.float().mean() > 0.5  # the check looks at most of the image
        assert (high - low)[seen].abs().max() < 1e-6
        patterns.append(torch.where(seen, high, 0.0))
    assert not torch.allclose(patterns[0], patterns[1])


def test_samplewise_noise_differs_within_a_class() -> None:
    images, labels = small_pool()
    result = METHODS["em-samplewise"](
        images, labels, eps=EPS, seed=0, **FAST_OPTIONS["em-samplewise"]
    )
    first, second = torch.nonzero(labels == 3).flatten()[:2]
    assert not torch.allclose(result.noise[first], result.noise[second])


@pytest.mark.parametrize("name", (*CLASSWISE, "em-samplewise"))
def test_a_method_that_needs_labels_says_so(name: str) -> None:
    images, _ = small_pool(2)
    with pytest.raises(ValueError, match=f"{name} .*needs labels"):
        METHODS[name](images, None, eps=EPS, seed=0)


@pytest.mark.parametrize("eps", [0.0, -0.1, 1.5, math.nan])
def test_eps_outside_zero_one_is_refused_by_value(eps: float) -> None:
    with pytest.raises(ValueError, match=r"eps must be in \(0, 1\].*got"):
        check_eps(eps)
    images, labels = small_pool(2)
    with pytest.raises(ValueError, match="eps must be in"):
        METHODS["random"](images, labels, eps=eps, seed=0)


def test_images_outside_zero_one_are_refused_with_their_range() -> None:
    images, labels = small_pool(2)
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\], got values in \[0, 255\]"):
        check_images(images * 255)
    with pytest.raises(ValueError, match=r"got values in \[-0.5"):
        METHODS["em-classwise"](images - 0.5, labels, eps=EPS, seed=0)


def test_project_bounds_the_noise_and_the_image() -> None:
    images = torch.tensor([[[[0.0, 0.5, 1.0, 0.95]]]])
    noise = project(images, torch.tensor([[[[-0.3, 0.3, 0.3, 0.1]]]]), 0.2)
    assert torch.allclose(noise, torch.tensor([[[[0.0, 0.2, 0.0, 0.05]]]]))


def test_unknown_option_and_bad_setting_are_named() -> None:
    images, labels = small_pool(2)
    with pytest.raises(UnlearnableError, match=r"unknown option\(s\) \['rounds'\]"):
        METHODS["em-classwise"](images, labels, eps=EPS, seed=0, rounds=3)
    with pytest.raises(UnlearnableError, match="pgd_steps must be >= 1, got 0"):
        METHODS["em-classwise"](images, labels, eps=EPS, seed=0, pgd_steps=0)
    with pytest.raises(UnlearnableError, match="surrogate 'dnn5' does not fit"):
        METHODS["em-classwise"](images[:, :, :20], labels, eps=EPS, seed=0, surrogate="dnn5")


@pytest.mark.parametrize("name", ("em-classwise", "em-samplewise", "mi-ue", "random"))
def test_block_noise_is_constant_on_its_squares(name: str) -> None:
    """``block`` = 7 on 28 x 28 digits: before the [0, 1] cut, each image's noise is one value
    per 7 x 7 square (4 x 4 values); the cut only shrinks it, so wherever the image is not at
    0 or 1 the noise equals its square's value."""
    images, labels = small_pool()
    options = {**FAST_OPTIONS.get(name, {}), "block": 7}
    result = METHODS[name](images, labels, eps=EPS, seed=0, **options)
    assert result.noise.abs().max() <= EPS + 1e-6 and result.noise.abs().max() > EPS / 2
    settings = result.info.get("settings", result.info)  # error-minimising nests its knobs
    assert settings["block"] == 7
    squares = result.noise.unfold(2, 7, 7).unfold(3, 7, 7)  # (N, C, 4, 4, 7, 7)
    free = ((result.images > 0) & (result.images < 1)).unfold(2, 7, 7).unfold(3, 7, 7)
    high = torch.where(free, squares, -math.inf).amax(dim=(-1, -2))
    low = torch.where(free, squares, math.inf).amin(dim=(-1, -2))
    seen = free.any(dim=-1).any(dim=-1)
    assert (high - low)[seen].abs().max() < 1e-6
    assert not torch.allclose(high[seen], high[seen].flatten()[0])  # not one value everywhere


@pytest.mark.parametrize("name", ("em-classwise", "mi-ue", "random"))
@pytest.mark.parametrize(
    ("block", "message"),
    [(0, "block must be >= 1, got 0"), (29, r"block must be <= the image side \(28\), got 29")],
)
def test_a_bad_block_is_refused_by_value(name: str, block: int, message: str) -> None:
    images, labels = small_pool(2)
    with pytest.raises(UnlearnableError, match=message):
        METHODS[name](images, labels, eps=EPS, seed=0, block=block)


def test_an_interrupted_run_resumes_to_the_same_noise(tmp_path) -> None:
    """The state is saved after every round; a rerun of the same call picks it up and ends with
    exactly the noise of an uninterrupted run (surrogate, optimizer and generator restored)."""
    images, labels = small_pool()
    options = {**FAST_OPTIONS["em-classwise"], "max_rounds": 3, "stop_accuracy": 1.0}
    whole = METHODS["em-classwise"](images, labels, eps=EPS, seed=1, **options)

    class Interrupted(Exception):
        pass

    def stop_after_two(done: int, _total: int, _detail: str) -> None:
        if done == 2:
            raise Interrupted

    state = tmp_path / "em.state.pt"
    with pytest.raises(Interrupted):
        METHODS["em-classwise"](
            images, labels, eps=EPS, seed=1, resume_path=state, progress=stop_after_two, **options
        )
    rounds_seen: list[int] = []
    resumed = METHODS["em-classwise"](
        images, labels, eps=EPS, seed=1, resume_path=state,
        progress=lambda done, _t, _d: rounds_seen.append(done), **options,
    )  # fmt: skip
    assert rounds_seen == [3]  # only the third round ran again
    assert torch.equal(resumed.noise, whole.noise)
    with pytest.raises(UnlearnableError, match="belongs to another run"):
        METHODS["em-classwise"](images, labels, eps=EPS, seed=2, resume_path=state, **options)


@pytest.mark.slow
def test_lenet5_learns_less_from_classwise_error_minimising_data() -> None:
    """LeNet-5 trained (10 epochs, seed 0) on 1,000 images of the embedded target-train split
    carrying class-wise error-minimising noise (eps 32/255, the default min-min loop) scores
    well below the same LeNet-5 trained on the clean images. Measured on this setting: clean
    91.1% for trainer seeds 0 and 1, protected 74.2% and 76.9% (docs/benchmarks.md), so a
    10-point margin leaves 4-7 points for machine-level float differences. It is not the
    "far below" the papers report on CIFAR-10: on MNIST the digits stay learnable beside the
    noise (see docs/benchmarks.md)."""
    train, test = load_dataset("mnist-embedded:target-train"), load_dataset("mnist-embedded:test")
    index = balanced_subset_indices(train.labels, 1000, seed=0)
    images, labels = train.as_float()[index], train.labels[index]
    protected = METHODS["em-classwise"](images, labels, eps=32 / 255, seed=0)
    assert protected.info["stopped_by"] == "stop_accuracy"  # the paper's rule ended it
    clean_score = clean_test_accuracy(images, labels, test.as_float(), test.labels, epochs=10)
    protected_score = clean_test_accuracy(
        protected.images, labels, test.as_float(), test.labels, epochs=10
    )
    assert clean_score > 0.85, clean_score
    assert protected_score < clean_score - 0.10, (clean_score, protected_score)
