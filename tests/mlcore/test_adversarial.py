"""White-box checks of the attacks both sides share (mlcore.adversarial) on a small trained
LeNet-5: IGSM lowers accuracy as its iterations grow, C&W L2 reaches its target with margin kappa
and its distortion falls with the binary search over c, the KL-evasive PGD keeps two models in
agreement; every result lies in [0, 1]; bad parameters are named."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from mlcore.adversarial import IGSM, PGD, CarliniWagnerL2, TwinEvasivePGD
from mlcore.architectures import build_model
from mlcore.datasets import load_dataset
from mlcore.divergences import kl_divergence
from mlcore.training import accuracy, fit, predict_labels, seed_everything

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _lenet(images: torch.Tensor, labels: torch.Tensor, *, seed: int) -> nn.Module:
    seed_everything(seed)
    return fit(build_model("lenet5"), images, labels, epochs=3, batch_size=32, seed=seed)


@pytest.fixture(scope="module")
def models() -> tuple[nn.Module, nn.Module]:
    """Two LeNet-5s on disjoint quarters of the embedded target-train split (3 epochs each)."""
    train = load_dataset("mnist-embedded:target-train")
    quarter = [torch.arange(start, len(train), 4) for start in (0, 1)]
    first, second = (
        _lenet(train.images[i], train.labels[i], seed=s)
        for s, i in zip((0, 7), quarter, strict=True)
    )
    return first, second


@pytest.fixture(scope="module")
def seeds(models: tuple[nn.Module, nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """48 test images (drawn at random) the first model classifies correctly, as floats in
    [0, 1], and their labels."""
    test = load_dataset("mnist-embedded:test")
    drawn = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:200]
    x, y = test.images[drawn].float() / 255.0, test.labels[drawn]
    right = predict_labels(models[0], x) == y
    assert accuracy(models[0], test.images, test.labels) > 0.6  # the fixture itself works
    return x[right][:48], y[right][:48]


def in_unit_box(adversarial: torch.Tensor) -> bool:
    return bool(adversarial.min() >= 0.0 and adversarial.max() <= 1.0)


# -- IGSM --------------------------------------------------------------------------------------
def test_igsm_lowers_accuracy_as_its_iterations_grow(
    models: tuple[nn.Module, nn.Module], seeds: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model, (x, y) = models[0], seeds
    accuracies = []
    for steps in (1, 2, 4, 8):
        adversarial = IGSM(steps=steps)(model, x, labels=y)
        assert in_unit_box(adversarial)
        assert (adversarial - x).abs().max() <= 0.3 + 1e-6
        accuracies.append((predict_labels(model, adversarial) == y).float().mean().item())
    # Starts at 100% (the seeds are classified correctly); each doubling of the iterations
    # must lower it, and 8 steps (the ball's edge is reached at 6) must leave almost nothing.
    assert all(later < earlier for earlier, later in itertools.pairwise(accuracies)), accuracies
    assert accuracies[-1] <= 0.1, accuracies


def test_igsm_is_pgd_from_the_image_without_a_random_start(
    models: tuple[nn.Module, nn.Module], seeds: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = seeds
    igsm = IGSM(eps=0.2, steps=3, step_size=0.05)(models[0], x, labels=y)
    pgd = PGD(eps=0.2, steps=3, step_size=0.05, random_start=False)(models[0], x, labels=y)
    assert torch.equal(igsm, pgd)


def test_igsm_is_untargeted_only(
    models: tuple[nn.Module, nn.Module], seeds: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = seeds
    with pytest.raises(ValueError, match="IGSM runs untargeted only, not targeted"):
        IGSM()(models[0], x, target=(y + 1) % 10)


# -- C&W L2 ------------------------------------------------------------------------------------
# MNIST pixels sit at 0 or 1, where tanh is flat: the authors' Adam step (0.01) needs about
# 1,000 steps to move them; ten times that step gets there in the few dozen a test can afford.
FAST = {"learning_rate": 0.1, "initial_const": 10.0}


def other_classes(labels: torch.Tensor) -> torch.Tensor:
    return (labels + 1 + torch.arange(len(labels)) % 9) % 10


def test_cw_reaches_its_target_with_margin_kappa(
    models: tuple[nn.Module, nn.Module], seeds: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model, (x, y) = models[0], seeds
    x, target, kappa = x[:16], other_classes(y[:16]), 2.0
    attack = CarliniWagnerL2(kappa=kappa, binary_search_steps=2, steps=150, **FAST)
    adversarial = attack(model, x, target=target)
    assert in_unit_box(adversarial)
    with torch.no_grad():
        margin = CarliniWagnerL2.margin(model(adversarial), target, targeted=True)
    won = margin > kappa
    assert won.float().mean() >= 0.8, margin  # 14 of 16 in 2 rounds of 150 steps
    assert (predict_labels(model, adversarial[won]) == target[won]).all()
    assert torch.equal(adversarial[~won], x[~won])  # a failure comes back unchanged


def test_cw_distortion_falls_with_the_binary_search(
    models: tuple[nn.Module, nn.Module], seeds: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """A large first c overshoots; the search lowers it, so the smallest success shrinks."""
    model, (x, y) = models[0], seeds
    x, target = x[:16], other_classes(y[:16])

    def l2(rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
        attack = CarliniWagnerL2(
            binary_search_steps=rounds, steps=60, learning_rate=0.1, initial_const=100.0
        )
        adversarial = attack(model, x, target=target)
        assert in_unit_box(adversarial)
        won = predict_labels(model, adversarial) == target
        return (adversarial - x).flatten(1).norm(dim=1), won

    one_round, won_once = l2(1)
    searched, won_searched = l2(5)
    both = won_once & won_searched
    assert both.sum() >= 12
    # Per example the search can only keep or improve the best success; on average it must
    # cut the distortion by at least a quarter (it cuts it by more than half here).
    assert (searched[both] <= one_round[both] + 1e-5).all()
    assert searched[both].mean() < 0.75 * one_round[both].mean()


def test_cw_untargeted_leaves_the_true_class(
    models: tuple[nn.Module, nn.Module], seeds: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model, (x, y) = models[0], seeds
    adversarial = CarliniWagnerL2(binary_search_steps=3, steps=60, **FAST)(
        model, x[:16], labels=y[:16]
    )
    assert in_unit_box(adversarial)
    assert (predict_labels(model, adversarial) != y[:16]).float().mean() >= 0.9


@pytest.mark.parametrize(
    "params,message",
    [
        ({"kappa": -1}, "kappa must be a number >= 0, got -1"),
        ({"kappa": math.inf}, "kappa must be finite, got inf"),
        ({"kappa": "1"}, "kappa must be a number >= 0, got '1'"),
        ({"binary_search_steps": 0}, "binary_search_steps must be an integer >= 1, got 0"),
        ({"steps": 1.5}, "steps must be an integer >= 1, got 1.5"),
        ({"learning_rate": 0}, "learning_rate must be > 0, got 0"),
        ({"initial_const": math.nan}, "initial_const must be a finite number > 0, got nan"),
        ({"abort_early": "no"}, "abort_early must be True or False, got 'no'"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_cw_bad_parameters_name_the_value(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CarliniWagnerL2(**params)


@pytest.mark.parametrize(
    "params,message",
    [
        ({"eps": 0}, "eps must be > 0, got 0"),
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"step_size": -0.1}, "step_size must be > 0, got -0.1"),
    ],
)
def test_igsm_bad_parameters_name_the_value(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IGSM(**params)


# -- PGD that keeps two models in agreement ------------------------------------------------------
def test_twin_evasive_pgd_keeps_the_divergence_low(
    models: tuple[nn.Module, nn.Module], seeds: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Same PGD, same seed, the penalty on: the examples reach the wanted class about as often,
    with a far lower KL(model || twin)."""
    model, twin = models
    x, target = seeds[0], other_classes(seeds[1])
    settings = {"eps": 0.3, "steps": 20, "seed": 0}
    plain = PGD(**settings)(model, x, target=target)
    evasive = TwinEvasivePGD(twin=twin, kl_weight=1.0, **settings)(model, x, target=target)
    assert in_unit_box(evasive) and (evasive - x).abs().max() <= 0.3 + 1e-6

    def success_and_kl(adversarial: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            logits, twin_logits = model(adversarial), twin(adversarial)
        success = (logits.argmax(dim=1) == target).float().mean().item()
        return success, float(kl_divergence(logits, twin_logits).mean())

    plain_success, plain_kl = success_and_kl(plain)
    evasive_success, evasive_kl = success_and_kl(evasive)
    assert evasive_success >= plain_success - 0.15, (plain_success, evasive_success)
    assert evasive_kl < 0.5 * plain_kl, (plain_kl, evasive_kl)


def test_twin_evasive_pgd_needs_a_model_and_a_positive_weight() -> None:
    with pytest.raises(ValueError, match="twin must be a torch model, got str"):
        TwinEvasivePGD(twin="twin.pt", eps=0.3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kl_weight must be > 0, got 0"):
        TwinEvasivePGD(twin=build_model("lenet5"), kl_weight=0, eps=0.3)
