"""The confidence / loss threshold attack (Yeom et al. 2018): members have lower loss.

Score: log p(true label | x) = -cross-entropy, from one probability query per candidate. Yeom's
attack thresholds the loss at the mean training loss; scored over every threshold (AUC, the
best balanced accuracy), the threshold needs no estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from attacker.membership.base import MembershipAttack
from attacker.oracle import ProbabilityOracle

FLOOR = 1e-300  # log(0) for a rounded probability of 0: the lowest score, still finite


@dataclass
class ThresholdAttack(MembershipAttack):
    name: ClassVar[str] = "threshold"
    needs_probabilities: ClassVar[bool] = True

    def _scores(
        self, oracle: ProbabilityOracle, images: np.ndarray, labels: np.ndarray
    ) -> np.ndarray:
        probabilities = oracle.predict_probabilities(images)
        return np.log(np.maximum(probabilities[np.arange(len(labels)), labels], FLOOR))
