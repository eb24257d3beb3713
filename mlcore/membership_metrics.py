"""How a membership-inference attack is scored, the way membership-inference competitions do it.

Both roles need the same figures: the service scores a challenge's submitted scores against the
ground truth it keeps, and the attacker (or a benchmark) scores an attack run on a local model.
Scores are "higher means member"; every figure is threshold-free or takes the best threshold:

- ``auc``: area under the ROC curve (sklearn's ``roc_auc_score``);
- ``balanced_accuracy``: the best (TPR + TNR) / 2 over all thresholds, the "balanced attack
  accuracy" of Carlini et al. 2022 (LiRA): an attacker who picks its threshold well;
- ``tpr_at_1pct_fpr`` / ``tpr_at_01pct_fpr``: the TPR at the highest threshold whose FPR is at
  most 1% / 0.1% (LiRA's low-FPR figures). With fewer than 1,000 non-members, 0.1% FPR means no
  false positive at all.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

# FPRs at which the ROC curve is published to the attacker (aggregate: no per-candidate figure)
ROC_GRID = (
    0.0,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    1.0,
)


def check_scores(scores: np.ndarray | list[float], n: int) -> np.ndarray:
    """``scores`` as float64, or ValueError naming what is wrong: not ``n`` of them, not finite."""
    values = np.asarray(scores, dtype=np.float64)
    if values.shape != (n,):
        raise ValueError(f"need exactly {n} scores (one per candidate), got {values.size}")
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise ValueError(
            f"scores must be finite numbers; score {int(bad[0])} is {float(values[bad[0]])}"
            f" ({len(bad)} not finite)"
        )
    return values


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float) -> float:
    """TPR at the highest threshold whose FPR is at most ``max_fpr`` (a ``roc_curve`` output)."""
    return float(tpr[np.flatnonzero(fpr <= max_fpr)[-1]])


def membership_metrics(is_member: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """The four figures of an attack's ``scores`` (higher = member) against the truth."""
    truth = np.asarray(is_member, dtype=bool)
    values = check_scores(scores, len(truth))
    if truth.all() or not truth.any():
        raise ValueError("scoring needs both members and non-members among the candidates")
    fpr, tpr, _ = roc_curve(truth, values)
    return {
        "auc": float(roc_auc_score(truth, values)),
        "balanced_accuracy": float(np.max((tpr + 1.0 - fpr) / 2.0)),
        "tpr_at_1pct_fpr": tpr_at_fpr(fpr, tpr, 0.01),
        "tpr_at_01pct_fpr": tpr_at_fpr(fpr, tpr, 0.001),
    }


def roc_points(is_member: np.ndarray, scores: np.ndarray) -> dict[str, list[float]]:
    """The ROC curve on the fixed ``ROC_GRID`` of FPRs (TPR at FPR <= each): what the attacker
    may see to draw its curve; aggregate figures only, never a candidate's membership."""
    fpr, tpr, _ = roc_curve(np.asarray(is_member, dtype=bool), np.asarray(scores, np.float64))
    return {"fpr": list(ROC_GRID), "tpr": [tpr_at_fpr(fpr, tpr, point) for point in ROC_GRID]}
