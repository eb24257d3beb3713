"""Issue 12, MI-UE and Unlearnable Clusters (the ue-cluster items): noise within eps and images
within [0, 1], one UC pattern per cluster, MI-UE raises the surrogate's intra-class feature
similarity, a UC run resumes to the noise an uninterrupted run ends with, bad input refused by
name."""

from __future__ import annotations

import math

import pytest
import torch

from defenses.unlearnable import METHODS
from defenses.unlearnable.mi_ue import class_separation, craft_mi_ue
from mlcore.architectures import build_model
from mlcore.datasets import balanced_subset_indices, load_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EPS = 32 / 255
# Tiny, fast settings: a surrogate trained 1 epoch, a few PGD steps.
UC_QUICK = {"clusters": 4, "surrogate_epochs": 1, "steps": 5}


@pytest.fixture(scope="module")
def pool() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("mnist-embedded:pool")
    chosen = balanced_subset_indices(data.labels, 120, seed=0)  # 12 per class
    return data.as_float()[chosen], data.labels[chosen]


def test_uc_noise_is_one_pattern_per_cluster_within_eps(pool):
    images, _ = pool
    result = METHODS["uc"](images, None, eps=EPS, seed=0, **UC_QUICK)
    assert result.labels is None  # label-agnostic: nothing invented
    assert result.noise.abs().max() <= EPS + 1e-6
    assert result.images.min() >= 0 and result.images.max() <= 1
    assert torch.allclose(result.images, images + result.noise, atol=1e-6)
    assert result.noise.abs().max() > EPS / 2  # the budget is used, not left at zero
    clusters = torch.tensor(result.info["clusters"])
    assert len(clusters) == len(images) and set(clusters.tolist()) == set(range(4))
    # Wherever the [0, 1] clip did not cut it, every image of a cluster has the same noise.
    unclipped = (result.images > 0) & (result.images < 1)
    patterns = []
    for cluster in range(4):
        noise, free = result.noise[clusters == cluster], unclipped[clusters == cluster]
        high = torch.where(free, noise, -math.inf).amax(dim=0)
        low = torch.where(free, noise, math.inf).amin(dim=0)
        seen = free.any(dim=0)
        assert seen.float().mean() > 0.5  # the check looks at most of the image
        assert (high - low)[seen].abs().max() < 1e-6
        patterns.append(torch.where(seen, high, 0.0))
    assert not torch.allclose(patterns[0], patterns[1])
    surrogate = result.info["surrogate"]
    assert surrogate["source"] == "digits-embedded:pool"
    assert 0 <= surrogate["heldout_accuracy"] <= 1


def test_uc_spins_clusters_toward_their_targets(pool):
    """The optimised patterns move each cluster's features to its target centre: on the
    surrogate, most protected images land nearer (cosine) to the next cluster's centre than to
    any other, where few clean images are (K-means put them near their own)."""
    from defenses.unlearnable.surrogate import penultimate_features, train_surrogate

    images, _ = pool
    result = METHODS["uc"](images, None, eps=EPS, seed=0, **{**UC_QUICK, "steps": 40})
    model, _ = train_surrogate(input_shape=(1, 28, 28), epochs=1, seed=0)  # the same surrogate
    clusters = torch.tensor(result.info["clusters"])
    clean = penultimate_features(model, images)
    centres = torch.nn.functional.normalize(
        torch.stack([clean[clusters == c].mean(0) for c in range(4)]), dim=1
    )

    def nearest_centre(features: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.normalize(features, dim=1) @ centres.T).argmax(dim=1)

    spun = (clusters + 1) % 4
    before = (nearest_centre(clean) == spun).float().mean()
    after = (nearest_centre(penultimate_features(model, result.images)) == spun).float().mean()
    assert before < 0.25 < 0.5 < after  # 0.25 is chance with 4 clusters


def test_uc_resumes_to_the_uninterrupted_noise(pool, tmp_path):
    images, _ = pool
    whole = METHODS["uc"](images, None, eps=EPS, seed=3, **UC_QUICK)

    def stop_after_two(done: int, _total: int, _value: float) -> None:
        if done == 2:
            raise KeyboardInterrupt

    state = tmp_path / "uc.state"
    with pytest.raises(KeyboardInterrupt):
        METHODS["uc"](
            images, None, eps=EPS, seed=3, progress=stop_after_two, resume_path=state, **UC_QUICK
        )
    seen: list[int] = []
    resumed = METHODS["uc"](
        images,
        None,
        eps=EPS,
        seed=3,
        progress=lambda done, _t, _v: seen.append(done),
        resume_path=state,
        **UC_QUICK,
    )
    assert seen == [3, 4]  # clusters 1 and 2 were not optimised again
    assert torch.equal(resumed.noise, whole.noise)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"clusters": 1}, ["clusters (p) must be an integer >= 2, got 1"]),
        ({"clusters": 121}, ["clusters (p) must be at most the 120 images, got 121"]),
        ({"eps": 0.0}, ["eps must be in (0, 1]", "got 0.0"]),
        ({"eps": 1.5}, ["eps must be in (0, 1]", "got 1.5"]),
    ],
)
def test_uc_refuses_bad_settings(pool, options, message):
    images, _ = pool
    settings = {"eps": EPS, "seed": 0, **UC_QUICK, **options}
    with pytest.raises(ValueError) as caught:
        METHODS["uc"](images, None, **settings)
    assert all(fragment in str(caught.value) for fragment in message)


def test_uc_refuses_a_surrogate_that_does_not_fit_the_images():
    rgb = torch.rand(20, 3, 32, 32)
    with pytest.raises(ValueError, match=r"digits-embedded:pool has images of shape \[1, 28, 28\]"):
        METHODS["uc"](rgb, None, eps=EPS, seed=0, **UC_QUICK)
    with pytest.raises(ValueError, match=r"surrogate does not fit images of shape \[3, 32, 32\]"):
        METHODS["uc"](
            rgb, None, eps=EPS, seed=0, **{**UC_QUICK, "surrogate": build_model("lenet5")}
        )


def test_mi_ue_raises_intra_class_similarity_within_eps(pool):
    images, labels = pool
    result, surrogate = craft_mi_ue(
        images, labels, eps=EPS, seed=0, rounds=2, noise_steps=5, stop_separation=2.0
    )
    assert result.noise.abs().max() <= EPS + 1e-6
    assert result.images.min() >= 0 and result.images.max() <= 1
    assert torch.equal(result.labels, labels)
    assert result.info["rounds"] == 2
    intra_clean, inter_clean = class_separation(surrogate, images, labels)
    intra_protected, inter_protected = class_separation(surrogate, result.images, labels)
    assert intra_protected > intra_clean + 0.01
    assert intra_protected - inter_protected > intra_clean - inter_clean + 0.05


def test_mi_ue_needs_labels(pool):
    images, _ = pool
    with pytest.raises(ValueError, match=r"mi-ue is class-wise .* needs labels"):
        METHODS["mi-ue"](images, None, eps=EPS, seed=0)
    with pytest.raises(ValueError, match="eps must be in"):
        METHODS["mi-ue"](images, pool[1], eps=-0.1, seed=0)


@pytest.mark.parametrize("name", ["uc", "mi-ue"])
def test_an_unknown_option_is_refused_by_name(pool, name):
    images, labels = pool
    with pytest.raises(ValueError, match=rf"unknown {name} option\(s\) \['cluster'\]; known: \["):
        METHODS[name](images, labels, eps=EPS, seed=0, cluster=3)
