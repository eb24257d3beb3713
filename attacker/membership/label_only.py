"""Label-only attacks (Choquette-Choo et al. 2021, "Label-Only Membership Inference Attacks").

- The gap attack: a candidate the model labels correctly is called a member (score 1, else 0);
  one query per candidate.
- The augmentation attack: query N shifted (and, with ``flip``, mirrored) copies of each
  candidate; a model is more stable on what it learnt, so the score is the share of copies
  labelled correctly. Shifts are by every (dx, dy) with |dx|, |dy| <= ``shift`` pixels, zero
  filled, the unshifted image included: N = (2 shift + 1)^2, doubled with ``flip``; N queries
  per candidate. The gap attack is the case shift 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from attacker.membership.base import MembershipAttack
from attacker.oracle import ProbabilityOracle


def shifted(images: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``images`` (n, C, H, W) moved dx pixels right and dy down, the uncovered border zero."""
    out = np.zeros_like(images)
    height, width = images.shape[2:]
    out[:, :, max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = images[
        :, :, max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return out


@dataclass
class AugmentationAttack(MembershipAttack):
    name: ClassVar[str] = "augmentation"
    needs_probabilities: ClassVar[bool] = False
    shift: int = 1
    flip: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.shift <= 4:
            raise ValueError(f"shift must be in 0..4 pixels, got {self.shift}")

    @property
    def copies(self) -> int:
        return (2 * self.shift + 1) ** 2 * (2 if self.flip else 1)

    def queries_needed(self, candidates: int) -> int:
        return candidates * self.copies

    def augmented(self, images: np.ndarray) -> np.ndarray:
        """The ``copies`` versions of every candidate, (copies, n, C, H, W)."""
        moves = range(-self.shift, self.shift + 1)
        versions = [shifted(images, dx, dy) for dy in moves for dx in moves]
        if self.flip:
            versions += [version[..., ::-1] for version in versions]
        return np.ascontiguousarray(np.stack(versions))

    def _scores(
        self, oracle: ProbabilityOracle, images: np.ndarray, labels: np.ndarray
    ) -> np.ndarray:
        copies = self.augmented(images)
        answers = oracle.predict_labels(copies.reshape(-1, *images.shape[1:]))
        return (answers.reshape(len(copies), len(images)) == labels).mean(axis=0)


@dataclass
class GapAttack(AugmentationAttack):
    name: ClassVar[str] = "gap"
    shift: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if self.shift or self.flip:
            raise ValueError("the gap attack queries each candidate as it is: shift 0, no flip")
