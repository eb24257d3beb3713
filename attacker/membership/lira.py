"""LiRA, offline (Carlini et al. 2022, "Membership Inference Attacks From First Principles").

Every shadow model is trained on a random half of the attacker's pool, which holds none of the
candidates, so each is an OUT model for every candidate. Per candidate, the shadows' logit-scaled
confidences phi = log(p_y / (1 - p_y)) fit a Gaussian N(mu_out, sigma_out^2); the target's phi
(one probability query) is scored by the one-sided test Pr[Z <= phi_target], here as the
z-score (phi_target - mu_out) / sigma_out, which ranks candidates exactly as that probability
does and never saturates at 1. With few shadows the paper uses one global sigma (the default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from attacker.membership.base import MembershipAttack, logit_confidence
from attacker.membership.shadow import ShadowSettings, shadow_probabilities, train_shadows
from attacker.oracle import ProbabilityOracle

MIN_SIGMA = 1e-6


@dataclass
class LiraOfflineAttack(MembershipAttack):
    name: ClassVar[str] = "lira"
    needs_probabilities: ClassVar[bool] = True
    shadow: ShadowSettings = field(default_factory=lambda: ShadowSettings(shadows=8))
    global_variance: bool = True

    def __post_init__(self) -> None:
        self.shadow.check()
        if not self.global_variance and self.shadow.shadows < 2:
            raise ValueError("a per-example variance needs at least 2 shadows (or global_variance)")

    def _scores(
        self, oracle: ProbabilityOracle, images: np.ndarray, labels: np.ndarray
    ) -> np.ndarray:
        shadows, _, _ = train_shadows(self.shadow, image_shape=images.shape[1:])
        decimals = self.shadow.decimals
        out = np.stack(
            [
                logit_confidence(
                    shadow_probabilities(s, images, decimals), labels, decimals=decimals
                )
                for s in shadows
            ]
        )  # (shadows, candidates)
        mean = out.mean(axis=0)
        sigma = out.std() if self.global_variance else out.std(axis=0)
        target = logit_confidence(oracle.predict_probabilities(images), labels, decimals=decimals)
        return (target - mean) / np.maximum(sigma, MIN_SIGMA)
