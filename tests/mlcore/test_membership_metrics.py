"""The membership figures: AUC, best balanced accuracy, TPR at a low FPR, and the score checks."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mlcore.membership_metrics import ROC_GRID, membership_metrics, roc_points


def test_one_non_member_above_every_member_costs_all_tpr_at_zero_fpr_only() -> None:
    truth = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    scores = np.r_[np.arange(100, 200), np.arange(100)].astype(float)
    scores[100] = 1000.0  # one non-member scores highest
    figures = membership_metrics(truth, scores)
    assert figures["tpr_at_01pct_fpr"] == 0.0  # 0.1% of 100 non-members: no false positive
    assert figures["tpr_at_1pct_fpr"] == 1.0  # one false positive is 1%
    assert figures["auc"] == pytest.approx(0.99)
    assert figures["balanced_accuracy"] == pytest.approx(0.995)
    curve = roc_points(truth, scores)
    assert curve["fpr"] == list(ROC_GRID) and curve["tpr"][0] == 0.0 and curve["tpr"][-1] == 1.0


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        ([0.1, 0.2], "need exactly 4 scores (one per candidate), got 2"),
        ([0.1, float("nan"), 0.2, 0.3], "score 1 is nan"),
        ([0.1, 0.2, float("-inf"), 0.3], "score 2 is -inf"),
    ],
)
def test_bad_scores_are_named(scores: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        membership_metrics(np.array([1, 1, 0, 0], bool), np.array(scores))


def test_scoring_needs_both_kinds_of_candidates() -> None:
    with pytest.raises(ValueError, match="both members and non-members"):
        membership_metrics(np.ones(3, bool), np.zeros(3))
