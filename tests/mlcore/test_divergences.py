"""Confidences near 1 and divergences: the float64 log-space arithmetic seed 001 depends on."""

import numpy as np
import pytest
import torch

from mlcore.architectures import build_model
from mlcore.checkpoints import load_checkpoint, save_checkpoint
from mlcore.divergences import (
    confident_indices,
    js_divergence,
    kl_divergence,
    label_log_confidence,
    pass_rate_threshold,
)


def test_log_space_tells_apart_confidences_float32_softmax_rounds_to_1():
    # p(label) = 1 / (1 + 9 e^-m): m = 21 gives about 1 - 6.8e-9, m = 23 about 1 - 9.2e-10.
    # Both sit far inside float32's half-ulp below 1 (3e-8), so any summation order rounds to 1.
    logits = torch.tensor([[21.0] + [0.0] * 9, [23.0] + [0.0] * 9])
    labels = torch.tensor([0, 0])
    assert torch.softmax(logits, 1)[:, 0].tolist() == [1.0, 1.0]  # float32 sees no difference
    assert confident_indices(logits, labels, 1 - 3e-9).tolist() == [1]
    expected = -np.log1p(9 * np.exp(-np.array([21.0, 23.0])))
    np.testing.assert_allclose(label_log_confidence(logits, labels), expected, rtol=1e-6, atol=0)


def test_keeps_exactly_the_rows_at_or_above_the_threshold():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 10)) * 4
    labels = rng.integers(0, 10, size=200)
    conf = torch.softmax(torch.tensor(logits, dtype=torch.float64), 1).numpy()[
        np.arange(200), labels
    ]
    for threshold in (0.1, 0.5, 0.9):
        assert (
            confident_indices(logits, labels, threshold).tolist()
            == np.flatnonzero(conf >= threshold).tolist()
        )


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.5, 1.5])
def test_a_threshold_outside_0_1_is_named(threshold):
    with pytest.raises(ValueError, match=f"threshold must be in \\(0, 1\\), got {threshold}"):
        confident_indices(np.zeros((1, 10)), np.zeros(1, dtype=int), threshold)


def test_divergences_are_zero_on_equal_models_and_kl_matches_the_definition():
    rng = np.random.default_rng(1)
    p, q = rng.normal(size=(50, 10)), rng.normal(size=(50, 10))
    np.testing.assert_allclose(kl_divergence(p, p), 0.0, atol=1e-12)
    np.testing.assert_allclose(js_divergence(p, p), 0.0, atol=1e-12)
    pp = np.exp(p) / np.exp(p).sum(1, keepdims=True)
    qq = np.exp(q) / np.exp(q).sum(1, keepdims=True)
    np.testing.assert_allclose(kl_divergence(p, q), (pp * np.log(pp / qq)).sum(1), rtol=1e-9)
    js = js_divergence(p, q)
    np.testing.assert_allclose(js, js_divergence(q, p), rtol=1e-9)
    assert np.all(js <= np.log(2) + 1e-12)


def test_pass_rate_threshold_lets_that_share_through():
    scores = np.arange(1000, dtype=np.float64)
    t = pass_rate_threshold(scores, 0.98)
    # at least the asked share passes, and at most one image more than that
    assert 0.98 <= np.mean(scores <= t) <= 0.98 + 1 / len(scores)
    with pytest.raises(ValueError, match=r"pass_rate must be in \(0, 1\), got 1.0"):
        pass_rate_threshold(scores, 1.0)


def test_checkpoints_carry_their_provenance(tmp_path):
    model = build_model("lenet5")
    provenance = {"parent": "lenet5-mnist.pt", "method": "self", "kept_indices": [0, 2, 5]}
    path = save_checkpoint(
        tmp_path / "m.pt",
        model,
        arch="lenet5",
        dataset="mnist-embedded:target-train",
        provenance=provenance,
    )
    assert load_checkpoint(path).provenance == provenance
