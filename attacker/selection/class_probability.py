"""HCP and LCP: the pool ordered by a model's confidence in each image's own label (DRMI paper,
5.4.2, after Orekondy et al.'s use of the target's class probabilities).

HCP ("high class probability": classified correctly with high confidence) takes the k images
whose probability of their own label is highest; LCP ("classified correctly with low
confidence", Table 12) the k lowest; as every strategy of the paper, per class (k split evenly:
``select_per_class``). An image counts as classified correctly when its label's probability is
the row's maximum; those come first for both, so LCP prefers uncertain-but-right images to
wrong ones, and only when k exceeds them are misclassified images taken, in the same order.
Ties go to the lower pool index. The probabilities are the guide (``guide = "probabilities"``):
the target's own when its output policy returns them, else a model of the attacker's."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from attacker.selection.base import GuideKind, SelectionResult, Selector, select_per_class

__all__ = ["HcpSelector", "LcpSelector"]


class _ClassProbabilitySelector(Selector):
    guide: ClassVar[GuideKind | None] = "probabilities"
    highest_first: ClassVar[bool]

    @property
    def params(self) -> dict[str, Any]:
        return {}

    def run(
        self, images: np.ndarray, labels: np.ndarray, *, k: int, guide: np.ndarray | None = None
    ) -> SelectionResult:
        assert guide is not None  # Selector.__call__ checked it: guide = "probabilities"
        confidence = guide[np.arange(len(labels)), labels]
        correct = confidence >= guide.max(axis=1)
        key = -confidence if self.highest_first else confidence

        def choose(_c: int, members: np.ndarray, k_c: int) -> tuple[np.ndarray, dict[str, Any]]:
            order = np.lexsort((members, key[members], ~correct[members]))  # last key first
            positions = order[:k_c]
            picked = confidence[members[positions]]
            return positions, {
                "misclassified": int(np.count_nonzero(~correct[members[positions]])),
                "min_confidence": float(picked.min()),
                "max_confidence": float(picked.max()),
            }

        return select_per_class(labels, k, choose)


class HcpSelector(_ClassProbabilitySelector):
    """The k images classified correctly with the highest confidence in their label."""

    highest_first = True


class LcpSelector(_ClassProbabilitySelector):
    """The k images classified correctly with the lowest confidence in their label."""

    highest_first = False
