"""What every membership-inference attack is: a scorer of candidates through an oracle.

An attack turns candidate images and their class labels into one score each, higher meaning
"member", buying what it needs from a ``ProbabilityOracle`` (an ``HttpOracle`` or a
``LocalOracle``: the same attack runs over HTTP and on a local model). Before anything is
bought, ``check_affordable`` refuses an attack the model's output policy or the remaining budget
cannot serve, saying which policy it needs or how many queries.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from attacker.oracle import (
    PROBABILITIES_POLICY,
    BudgetTooSmall,
    ProbabilitiesUnavailable,
    ProbabilityOracle,
)


class MembershipAttack(ABC):
    """Subclasses are dataclasses whose fields are the attack's parameters (validated in
    ``__post_init__``, reported by ``parameters``)."""

    name: ClassVar[str]
    needs_probabilities: ClassVar[bool]

    def queries_needed(self, candidates: int) -> int:
        """Queries the attack buys for ``candidates`` candidates (one each unless it says)."""
        return candidates

    def parameters(self) -> dict[str, Any]:
        """The attack's parameters, JSON-ready, for the report."""
        fields = dataclasses.asdict(self)  # type: ignore[call-overload]
        return json.loads(json.dumps(fields, default=str))  # paths as text

    def scores(
        self, oracle: ProbabilityOracle, images: np.ndarray, labels: np.ndarray
    ) -> np.ndarray:
        """One float64 score per candidate, higher = member."""
        images, labels = check_candidates(images, labels)
        return np.asarray(self._scores(oracle, images, labels), dtype=np.float64)

    @abstractmethod
    def _scores(
        self, oracle: ProbabilityOracle, images: np.ndarray, labels: np.ndarray
    ) -> np.ndarray: ...


def check_candidates(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"candidates must be uint8 images (n, C, H, W), got {images.dtype} {images.shape}"
        )
    if labels.shape != (len(images),) or len(images) == 0:
        raise ValueError(
            f"need one label per candidate image (at least one), got {labels.shape[0]} labels "
            f"for {len(images)} images"
        )
    return images, labels


def check_affordable(
    attack: MembershipAttack,
    candidates: int,
    *,
    output_policy: str,
    queries_remaining: int | None,
) -> int:
    """The queries ``attack`` needs for ``candidates``; raises ProbabilitiesUnavailable (naming
    the policy it needs) or BudgetTooSmall (saying how many it needs) before anything is bought."""
    if attack.needs_probabilities and not output_policy.startswith("probabilities"):
        raise ProbabilitiesUnavailable(
            f"the {attack.name} attack needs class probabilities, and the model answers with the "
            f"{output_policy!r} output policy: it needs the {PROBABILITIES_POLICY!r} policy "
            "(label-only attacks: gap, augmentation); nothing was bought"
        )
    needed = attack.queries_needed(candidates)
    if queries_remaining is not None and needed > queries_remaining:
        raise BudgetTooSmall(
            f"the {attack.name} attack needs {needed} queries for {candidates} candidates and "
            f"the budget has {queries_remaining} left; nothing was bought",
            needed=needed,
            remaining=queries_remaining,
        )
    return needed


def logit_confidence(
    probabilities: np.ndarray, labels: np.ndarray, *, decimals: int | None
) -> np.ndarray:
    """LiRA's logit-scaled confidence log(p_y / (1 - p_y)) of the true label, float64.

    Probabilities rounded to ``decimals`` are clipped half a rounding unit inside (0, 1) (a
    rounded 1.0 means "at least 1 - 0.5e-decimals"); unrounded ones at float64's resolution.
    """
    eps = 1e-15 if decimals is None else 0.5 * 10.0**-decimals
    p = np.clip(probabilities[np.arange(len(labels)), labels], eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)
