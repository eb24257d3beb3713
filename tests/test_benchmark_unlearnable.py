"""benchmarks/unlearnable.py's measuring parts (issue 12): the feature-MI estimator tells paired
features from unpaired ones, the countermeasures keep images in [0, 1] and soft labels summing
to one, and the "first eps under a level" read-out picks the smallest eps."""

from __future__ import annotations

import pytest
import torch

from benchmarks.unlearnable import (
    augment,
    feature_mutual_information,
    first_eps_below,
    jpeg,
    parse_eps,
)


def test_feature_mi_is_high_for_the_same_features_and_low_for_shuffled_ones():
    features = torch.rand(500, 6, generator=torch.Generator().manual_seed(0))
    shuffled = features[torch.randperm(500, generator=torch.Generator().manual_seed(1))]
    same = feature_mutual_information(features, features)
    unpaired = feature_mutual_information(features, shuffled)
    assert same > 2.5  # log(20 bins) = 3.0 nats for identical, evenly binned features
    assert unpaired < 0.6  # the plug-in estimator's bias: about (20 - 1)^2 / (2 x 500) = 0.36


@pytest.mark.parametrize("kind", ["gaussian", "cutout", "mixup", "cutmix"])
def test_countermeasures_keep_images_in_range_and_labels_a_distribution(kind):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(16, 1, 28, 28, generator=generator)
    targets = torch.nn.functional.one_hot(torch.arange(16) % 10, 10).float()
    out, soft = augment(kind, images, targets, generator)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert torch.allclose(soft.sum(dim=1), torch.ones(16))
    assert not torch.equal(out, images)


def test_jpeg_round_trip_changes_noise_but_keeps_the_range():
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    squeezed = jpeg(images, quality=10)
    assert squeezed.shape == images.shape and squeezed.min() >= 0 and squeezed.max() <= 1
    assert (squeezed - images).abs().mean() > 0.05


def test_first_eps_below_picks_the_smallest_eps_under_the_level():
    summary = [
        {"row": 2, "variant": "lenet5", "method": "m", "eps": eps, "mean": mean}
        for eps, mean in (("64/255", 0.1), ("16/255", 0.7), ("32/255", 0.4))
    ]
    assert first_eps_below(summary, 0.5) == {"m": "32/255"}
    assert first_eps_below(summary, 0.2) == {"m": "64/255"}
    assert first_eps_below(summary, 0.05) == {"m": None}
    assert parse_eps("32/255") == pytest.approx(0.12549, abs=1e-5)
