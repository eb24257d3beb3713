"""Scoring an attack without the service: on a local model, or any oracle, with known truth.

The figures are the service's own (``mlcore.membership_metrics``, sklearn's ROC), so a
benchmark that drives attacks on a ``LocalOracle`` reports what a challenge would.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attacker.membership.base import MembershipAttack
from attacker.oracle import ProbabilityOracle
from mlcore.membership_metrics import membership_metrics, roc_points

__all__ = ["evaluate_attack", "membership_metrics", "roc_points"]


def evaluate_attack(
    attack: MembershipAttack,
    oracle: ProbabilityOracle,
    members: tuple[np.ndarray, np.ndarray],
    non_members: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """Run ``attack`` on ``members`` and ``non_members`` (each ``(uint8 images, labels)``);
    returns the four figures, the queries it paid for and its parameters."""
    images = np.concatenate([members[0], non_members[0]])
    labels = np.concatenate([members[1], non_members[1]])
    truth = np.r_[np.ones(len(members[0]), bool), np.zeros(len(non_members[0]), bool)]
    paid_before = oracle.meter.paid
    scores = attack.scores(oracle, images, labels)
    return {
        "attack": attack.name,
        **membership_metrics(truth, scores),
        "queries_paid": oracle.meter.paid - paid_before,
        "parameters": attack.parameters(),
    }
