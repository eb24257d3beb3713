"""The detector of adversarial queries: how far the sanitised model's answer is from the
unsanitised (parent) model's, per image, flagged above a threshold set from a target pass rate of
normal images.

Scores (higher = more suspicious), all float64 from the two models' logits:

- ``kl``: KL(p_parent || p_sanitised), the paper's detector.
- ``js``: Jensen-Shannon divergence, symmetric and bounded by log 2 (a variant the paper did not try).
- ``disagree``: 1 when the two models' top labels differ, else 0 (a variant: reject whenever they
  disagree). It is binary, so a pass rate cannot place its threshold: the threshold is fixed at
  0.5 (flag every disagreement) and the pass rate it achieves on normal images is measured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import numpy as np
import torch

from defenses.sanitization.errors import SanitizationError, check_unit_interval
from mlcore.divergences import js_divergence, kl_divergence, pass_rate_threshold

ScoreKind = Literal["kl", "js", "disagree"]
SCORE_KINDS: tuple[str, ...] = get_args(ScoreKind)
DISAGREE_THRESHOLD = 0.5


def disagreement(
    parent_logits: torch.Tensor | np.ndarray, sanitized_logits: torch.Tensor | np.ndarray
) -> np.ndarray:
    """1.0 where the two models' top labels differ, else 0.0 (float64)."""
    parent = torch.as_tensor(parent_logits).argmax(dim=1)
    sanitized = torch.as_tensor(sanitized_logits).argmax(dim=1)
    return (parent != sanitized).numpy().astype(np.float64)


SCORES: dict[str, Callable[..., np.ndarray]] = {
    "kl": kl_divergence,
    "js": js_divergence,
    "disagree": disagreement,
}


def check_score_kind(kind: str) -> str:
    if kind not in SCORES:
        raise SanitizationError(f"score must be one of {list(SCORE_KINDS)}, got {kind!r}")
    return kind


def detection_scores(
    kind: str,
    parent_logits: torch.Tensor | np.ndarray,
    sanitized_logits: torch.Tensor | np.ndarray,
) -> np.ndarray:
    """Per-image score of ``kind`` (float64, higher = more likely adversarial)."""
    return SCORES[check_score_kind(kind)](parent_logits, sanitized_logits)


def score_threshold(kind: str, normal_scores: np.ndarray, pass_rate: float) -> float:
    """The threshold that lets ``pass_rate`` of these normal scores through (score <= threshold
    passes); for ``disagree`` the fixed 0.5."""
    check_score_kind(kind)
    check_unit_interval("pass_rate", pass_rate)
    if kind == "disagree":
        return DISAGREE_THRESHOLD
    return pass_rate_threshold(normal_scores, pass_rate)


def flagged(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The detector's decision: strictly above the threshold is flagged."""
    return np.asarray(scores, dtype=np.float64) > threshold


def detection_rate(scores: np.ndarray, threshold: float) -> float:
    """Share of these (adversarial) images flagged at ``threshold``."""
    return float(flagged(scores, threshold).mean())


def roc_auc(normal_scores: np.ndarray, adversarial_scores: np.ndarray) -> float:
    """Area under the ROC curve of separating adversarial (positive) from normal images by score:
    0.5 is chance, 1 is perfect, independent of any threshold."""
    normal = np.asarray(normal_scores, dtype=np.float64)
    adversarial = np.asarray(adversarial_scores, dtype=np.float64)
    if len(normal) == 0 or len(adversarial) == 0:
        raise SanitizationError(
            f"need normal and adversarial scores, got {len(normal)} and {len(adversarial)}"
        )
    from sklearn.metrics import roc_auc_score  # imported here: sklearn is slow to import

    truth = np.r_[np.zeros(len(normal)), np.ones(len(adversarial))]
    return float(roc_auc_score(truth, np.r_[normal, adversarial]))
