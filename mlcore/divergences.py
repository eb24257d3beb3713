"""Confidences and divergences from logits, in float64 log space.

Shared by the defender (sanitisation and the KL detector of "Less is More", seed 001) and the
attacker (its adaptive twin), so both sides compute the same numbers. Why float64 log space: the
paper's self-sanitisation threshold is 0.9999999, and a float32 softmax rounds every confidence
above about 0.99999994 to exactly 1, so it cannot tell 0.9999999 from 1.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "confident_indices",
    "js_divergence",
    "kl_divergence",
    "label_log_confidence",
    "log_probabilities",
    "pass_rate_threshold",
]


def log_probabilities(logits: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(n, classes) logits -> float64 log-softmax."""
    return torch.log_softmax(torch.as_tensor(logits).to(torch.float64), dim=1)


def label_log_confidence(
    logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray
) -> np.ndarray:
    """log p(label | x) per row, float64: compare with ``np.log(threshold)``, never exponentiate."""
    log_p = log_probabilities(logits)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.shape != (log_p.shape[0],):
        raise ValueError(
            f"need one label per row of logits {tuple(log_p.shape)}, got {tuple(labels.shape)}"
        )
    return log_p.gather(1, labels[:, None])[:, 0].numpy()


def confident_indices(
    logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, threshold: float
) -> np.ndarray:
    """Indices (ascending) of the rows whose confidence on their label is at or above ``threshold``."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    return np.flatnonzero(label_log_confidence(logits, labels) >= np.log(threshold))


def kl_divergence(
    p_logits: torch.Tensor | np.ndarray, q_logits: torch.Tensor | np.ndarray
) -> np.ndarray:
    """KL(p || q) per row, float64, from the two models' logits (p: unsanitised, q: sanitised)."""
    log_p, log_q = log_probabilities(p_logits), log_probabilities(q_logits)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).clamp_min(0.0).numpy()


def js_divergence(
    p_logits: torch.Tensor | np.ndarray, q_logits: torch.Tensor | np.ndarray
) -> np.ndarray:
    """Jensen-Shannon divergence per row (nats, symmetric, at most log 2), float64."""
    log_p, log_q = log_probabilities(p_logits), log_probabilities(q_logits)
    log_m = torch.logaddexp(log_p, log_q) - np.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(dim=1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(dim=1)
    return (0.5 * (kl_pm + kl_qm)).clamp_min(0.0).numpy()


def pass_rate_threshold(normal_scores: np.ndarray, pass_rate: float) -> float:
    """The score threshold that lets ``pass_rate`` of these normal images through (score <= t)."""
    if not 0.0 < pass_rate < 1.0:
        raise ValueError(f"pass_rate must be in (0, 1), got {pass_rate}")
    scores = np.asarray(normal_scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) < 1 or not np.all(np.isfinite(scores)):
        raise ValueError("normal_scores must be a non-empty 1-D array of finite numbers")
    return float(np.quantile(scores, pass_rate, method="higher"))
