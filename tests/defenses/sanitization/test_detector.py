"""The detector: the score threshold passes the configured share of held-out normal images, and
the KL score separates white-box adversarial examples against the sanitised model from normal
images (ROC AUC well above 0.5); the score variants and metrics are what they say."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from defenses.sanitization import SanitizationError
from defenses.sanitization.detector import (
    detection_rate,
    detection_scores,
    disagreement,
    flagged,
    roc_auc,
    score_threshold,
)
from defenses.sanitization.evaluation import compare_scores
from defenses.sanitization.heldout import held_out_split
from mlcore.training import predict_logits


def scores_of(pair, images: torch.Tensor, kind: str = "kl") -> np.ndarray:
    return detection_scores(
        kind, predict_logits(pair.parent, images), predict_logits(pair.sanitized, images)
    )


def binomial_tolerance(pass_rate: float, n: int) -> float:
    """Four standard deviations of the difference between two independent pass shares of n
    images each (the threshold is a quantile of one half, measured on the other): the observed
    share is off by more with probability about 6e-5."""
    return 4 * math.sqrt(2 * pass_rate * (1 - pass_rate) / n)


def test_the_stored_threshold_passes_the_target_share_of_the_calibration_half(self_pair):
    held_out = held_out_split(self_pair.provenance["train_data"])
    assert self_pair.provenance["calibration_indices"] == held_out.calibration_indices.tolist()
    scores = scores_of(self_pair, held_out.calibration.images)
    passed = 1 - flagged(scores, self_pair.score_threshold).mean()
    assert passed == pytest.approx(self_pair.provenance["calibration_pass_rate"])
    # the smallest threshold passing at least 98%: one image fewer would pass too few
    assert self_pair.pass_rate <= passed < self_pair.pass_rate + 1 / len(scores) + 1e-12


@pytest.mark.parametrize("pass_rate", [0.90, 0.95, 0.98])
def test_the_threshold_passes_the_target_share_of_unseen_normal_images(self_pair, pass_rate):
    held_out = held_out_split(self_pair.provenance["train_data"])
    threshold = score_threshold("kl", scores_of(self_pair, held_out.calibration.images), pass_rate)
    evaluation = scores_of(self_pair, held_out.evaluation.images)
    passed = 1 - flagged(evaluation, threshold).mean()
    assert abs(passed - pass_rate) <= binomial_tolerance(pass_rate, len(evaluation))


def minimal_targeted_pgd(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, eps: float, step: float, steps: int
) -> torch.Tensor:
    """Plain targeted L-inf PGD (white-box), except that each image stops moving as soon as the
    model predicts its target: the least-distorted success, as C&W with kappa 0 finds it."""
    adversarial = x.clone()
    for _ in range(steps):
        moving = model(adversarial).argmax(1) != target
        if not moving.any():
            break
        batch = adversarial[moving].requires_grad_(True)
        loss = nn.functional.cross_entropy(model(batch), target[moving])
        (gradient,) = torch.autograd.grad(loss, batch)
        moved = batch.detach() - step * gradient.sign()
        adversarial[moving] = (x[moving] + (moved - x[moving]).clamp(-eps, eps)).clamp(0, 1)
    return adversarial.detach()


def test_kl_separates_white_box_attacks_on_the_sanitised_model_from_normal_images(self_pair):
    """Why the bound (AUC >= 0.7) is robust: a least-distorted targeted example sits just past
    the sanitised model's decision boundary, so the sanitised model is unsure there, while the
    parent (other training set, other run) does not share that boundary point and mostly still
    answers the true class with confidence; KL(parent || sanitised) is then of order
    log(1 / p_sanitised(true class)), far above its value on normal images, where both models are
    confident and agree. Chance is 0.5; runs give 0.81-0.88 (KL and JS, twin trained 1 or 4
    epochs). Attacks pushed far past the boundary (eps 0.5 without stopping) also fool the parent
    and evade KL (AUC about 0.5 in the same runs): that is a finding, not what this test pins."""
    evaluation = held_out_split(self_pair.provenance["train_data"]).evaluation
    x, y = evaluation.as_float()[:200], evaluation.labels[:200]
    target = (y + 1) % 10
    adversarial = minimal_targeted_pgd(
        self_pair.sanitized, x, target, eps=0.3, step=0.01, steps=100
    )
    fooled = predict_logits(self_pair.sanitized, adversarial).argmax(1) == target
    assert fooled.float().mean() > 0.5  # the attack works on the model it targets
    auc = roc_auc(scores_of(self_pair, x), scores_of(self_pair, adversarial[fooled]))
    assert auc >= 0.7, auc


def test_disagreement_flags_every_top_label_difference_whatever_the_pass_rate():
    parent = torch.tensor([[5.0, 0.0], [0.0, 5.0], [1.0, 0.0]])
    sanitized = torch.tensor([[4.0, 0.0], [5.0, 0.0], [0.0, 1.0]])
    scores = disagreement(parent, sanitized)
    assert scores.tolist() == [0.0, 1.0, 1.0]
    assert score_threshold("disagree", scores, 0.98) == 0.5
    assert flagged(scores, 0.5).tolist() == [False, True, True]


def test_roc_auc_thresholds_and_detection_rates_on_known_scores():
    normal = np.arange(100, dtype=np.float64)  # 0..99
    adversarial = np.array([50.0, 95.5, 200.0, 300.0])
    assert roc_auc(normal, adversarial) == pytest.approx((50.5 + 96 + 100 + 100) / 400)
    # thresholds (higher quantiles): 90% pass -> 90, 95% -> 95, 98% -> 98; flagged is strictly above
    thresholds = [score_threshold("kl", normal, rate) for rate in (0.9, 0.95, 0.98)]
    assert thresholds == [90.0, 95.0, 98.0]
    assert [detection_rate(adversarial, t) for t in thresholds] == [0.75, 0.75, 0.5]
    with pytest.raises(
        SanitizationError, match="need normal and adversarial scores, got 100 and 0"
    ):
        roc_auc(normal, np.array([]))


@pytest.mark.parametrize(
    ("kind", "pass_rate", "message"),
    [("kl", 1.0, "pass_rate must be in"), ("hellinger", 0.9, "score must be one of")],
)
def test_bad_detector_parameters_are_named(kind, pass_rate, message):
    with pytest.raises(SanitizationError, match=message):
        score_threshold(kind, np.zeros(10), pass_rate)


def test_every_score_kind_is_compared_on_the_same_images(self_pair):
    evaluation = held_out_split(self_pair.provenance["train_data"]).evaluation
    x, y = evaluation.as_float()[:100], evaluation.labels[:100]
    adversarial = minimal_targeted_pgd(
        self_pair.sanitized, x, (y + 1) % 10, eps=0.3, step=0.01, steps=100
    )
    comparison = compare_scores(self_pair, adversarial)
    assert set(comparison) == {"kl", "js", "disagree"}
    kl = comparison["kl"]
    assert kl["thresholds"][0.98] == pytest.approx(
        self_pair.score_threshold
    )  # same rule as the pair's
    assert kl["roc_auc"] == roc_auc(
        scores_of(self_pair, evaluation.images), scores_of(self_pair, adversarial)
    )
    for result in comparison.values():
        # a stricter pass rate never flags more
        assert result["false_reject"][0.9] >= result["false_reject"][0.98]
        assert result["detection"][0.9] >= result["detection"][0.98]
    # disagree ignores the pass rate: one threshold, one false-reject share
    assert len(set(comparison["disagree"]["false_reject"].values())) == 1
