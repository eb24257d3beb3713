"""Membership-inference attacks on local models: the threshold attack separates the members of
a deliberately overfit model and is at chance on a model that never saw them; the shadow-model
and LiRA attacks beat chance on it too; label-only attacks pay exactly N queries per candidate;
an attack the policy or the budget cannot serve is refused before anything is bought."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from attacker.membership.attacks import ATTACKS, make_attack
from attacker.membership.base import check_affordable, logit_confidence
from attacker.membership.label_only import AugmentationAttack, shifted
from attacker.membership.scoring import evaluate_attack
from attacker.oracle import BudgetTooSmall, LocalOracle, ProbabilitiesUnavailable
from mlcore.architectures import build_model
from mlcore.datasets import load_dataset
from mlcore.training import fit, seed_everything

MEMBERS, NON_MEMBERS = 100, 200


def _train(images, labels) -> nn.Module:
    """DNN5 (an MLP) for 40 epochs on 100 images: deliberately overfit (about 74% test accuracy)."""
    seed_everything(0)
    return fit(build_model("dnn5"), images, labels, epochs=40, batch_size=16, seed=0)


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    train = load_dataset("mnist-embedded:target-train")
    test = load_dataset("mnist-embedded:test")
    members = rng.choice(len(train), MEMBERS, replace=False)  # random: the splits sort by class
    non_members = rng.choice(len(test), NON_MEMBERS, replace=False)
    return {
        "members": (train.images[members].numpy(), train.labels[members].numpy()),
        "non_members": (test.images[non_members].numpy(), test.labels[non_members].numpy()),
    }


@pytest.fixture(scope="module")
def overfit(data: dict) -> nn.Module:
    images, labels = data["members"]
    import torch

    return _train(torch.from_numpy(images), torch.from_numpy(labels))


@pytest.fixture(scope="module")
def never_saw_them() -> nn.Module:
    """The same recipe on 100 images of the attacker's pool: none of the members."""
    pool = load_dataset("mnist-embedded:pool")
    chosen = np.random.default_rng(1).choice(len(pool), MEMBERS, replace=False)
    return _train(pool.images[chosen], pool.labels[chosen])


def test_threshold_attack_separates_an_overfit_models_members(
    data: dict, overfit: nn.Module
) -> None:
    result = evaluate_attack(
        make_attack("threshold"), LocalOracle(overfit), data["members"], data["non_members"]
    )
    assert result["auc"] > 0.75
    assert result["balanced_accuracy"] > 0.65
    assert result["queries_paid"] == MEMBERS + NON_MEMBERS  # one query per candidate


def test_threshold_attack_is_at_chance_on_a_model_that_never_saw_the_members(
    data: dict, never_saw_them: nn.Module
) -> None:
    result = evaluate_attack(
        make_attack("threshold"), LocalOracle(never_saw_them), data["members"], data["non_members"]
    )
    assert abs(result["auc"] - 0.5) < 0.1


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("shadow", {"shadows": 2, "size": 100, "arch": "dnn5", "epochs": 20, "batch_size": 16}),
        ("lira", {"shadows": 3, "size": 100, "arch": "dnn5", "epochs": 20, "batch_size": 16}),
    ],
)
def test_shadow_attacks_beat_chance_on_the_overfit_model(
    data: dict, overfit: nn.Module, name: str, params: dict
) -> None:
    oracle = LocalOracle(overfit)
    result = evaluate_attack(
        make_attack(name, **params), oracle, data["members"], data["non_members"]
    )
    assert result["auc"] > 0.7
    assert result["queries_paid"] == MEMBERS + NON_MEMBERS  # shadows cost no query
    assert result["parameters"]["shadow"]["shadows"] == params["shadows"]


@pytest.mark.parametrize(("shift", "flip", "copies"), [(0, False, 1), (1, False, 9), (1, True, 18)])
def test_label_only_attacks_pay_n_queries_per_candidate(
    data: dict, overfit: nn.Module, shift: int, flip: bool, copies: int
) -> None:
    attack = (
        make_attack("gap") if shift == 0 else make_attack("augmentation", shift=shift, flip=flip)
    )
    oracle = LocalOracle(overfit)
    result = evaluate_attack(attack, oracle, data["members"], data["non_members"])
    assert attack.queries_needed(10) == 10 * copies
    assert result["queries_paid"] == (MEMBERS + NON_MEMBERS) * copies
    assert result["auc"] > 0.6  # members are labelled right (and stably) more often


def test_shifted_copies_move_the_image_and_fill_with_zeros() -> None:
    image = np.arange(16, dtype=np.uint8).reshape(1, 1, 4, 4) + 1
    right = shifted(image, 1, 0)[0, 0]
    assert (right[:, 0] == 0).all() and (right[:, 1:] == image[0, 0, :, :3]).all()
    up = shifted(image, 0, -1)[0, 0]
    assert (up[-1] == 0).all() and (up[:3] == image[0, 0, 1:]).all()
    copies = AugmentationAttack(shift=1, flip=True).augmented(image)
    assert copies.shape == (18, 1, 1, 4, 4)
    assert (copies[4] == image).all()  # the unshifted image is one of the copies


class CountingOracle(LocalOracle):
    """Counts every request: a refused attack must not send one."""

    requests = 0

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        self.requests += 1
        return super().predict_labels(images)

    def predict_probabilities(self, images: np.ndarray) -> np.ndarray:
        self.requests += 1
        return super().predict_probabilities(images)


@pytest.mark.parametrize("name", ["threshold", "shadow", "lira"])
def test_attacks_that_need_probabilities_name_the_policy_against_a_label_only_model(
    name: str,
) -> None:
    with pytest.raises(ProbabilitiesUnavailable, match="'probabilities:DECIMALS' policy"):
        check_affordable(
            make_attack(name), 100, output_policy="label-only", queries_remaining=10_000
        )
    for policy in ("label-only", "top-k:3"):  # label-only attacks are fine with any policy
        assert check_affordable(
            make_attack("gap"), 100, output_policy=policy, queries_remaining=100
        )


def test_a_budget_too_small_says_how_many_queries_the_attack_needs() -> None:
    attack = make_attack("augmentation", shift=1)
    with pytest.raises(BudgetTooSmall, match="needs 900 queries for 100 candidates") as caught:
        check_affordable(attack, 100, output_policy="label-only", queries_remaining=899)
    assert (caught.value.needed, caught.value.remaining) == (900, 899)
    assert check_affordable(attack, 100, output_policy="label-only", queries_remaining=900) == 900


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("nope", {}, "unknown attack 'nope'; known: augmentation, gap, lira, shadow, threshold"),
        ("augmentation", {"shift": 9}, "shift must be in 0..4 pixels, got 9"),
        ("gap", {"shift": 1}, "shift 0, no flip"),
        ("shadow", {"shadows": 0}, "shadows must be >= 1, got 0"),
        ("lira", {"arch": "vgg"}, "arch must be one of"),
        ("threshold", {"shadows": 3}, r"unknown parameter for the threshold attack: \['shadows'\]"),
        ("gap", {"shadows": 3}, "unknown parameter for the gap attack"),
        ("lira", {"shadows": 1, "global_variance": False}, "at least 2 shadows"),
    ],
)
def test_bad_attack_parameters_are_named(name: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_attack(name, **params)


def test_candidates_must_be_images_with_one_label_each(overfit: nn.Module) -> None:
    oracle = CountingOracle(overfit)
    with pytest.raises(ValueError, match="one label per candidate"):
        make_attack("threshold").scores(oracle, np.zeros((3, 1, 28, 28), np.uint8), np.zeros(2))
    with pytest.raises(ValueError, match="uint8 images"):
        make_attack("gap").scores(oracle, np.zeros((3, 28, 28), np.float32), np.zeros(3))
    assert oracle.requests == 0


def test_logit_confidence_clips_rounded_probabilities_half_a_unit_inside() -> None:
    probabilities = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    phi = logit_confidence(probabilities, np.array([0, 0, 0]), decimals=2)
    assert np.allclose(phi, [np.log(0.995 / 0.005), np.log(0.005 / 0.995), 0.0])
    assert set(ATTACKS) == {"threshold", "shadow", "lira", "gap", "augmentation"}


def test_the_command_names_an_option_the_attack_does_not_take_before_any_request() -> None:
    from typer.testing import CliRunner

    from attacker.cli import app

    result = CliRunner().invoke(
        app,
        [
            "membership", "--url", "http://127.0.0.1:9", "--api-key", "k", "--challenge", "c",
            "--attack", "threshold", "--shadows", "3",
        ],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "unknown parameter for the threshold attack: ['shadows']" in " ".join(
        result.output.split()
    )
