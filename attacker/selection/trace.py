"""TRACE: activation traces of the attacker's own model (DRMI paper, 5.4.3, Table 13).

Each pool image leaves a binary trace (which neurons it activates; see
``guides.activations_from_model``), and the distance between two images is the Hamming distance
of their traces, I[a][b] = Hamming(Tr_a, Tr_b) (Eq. 11). The paper then runs DRMI's Algorithm 1
on I in place of the MI matrix, in two directions:

* MIN (``trace-min``): the k-subset with the smallest Hamming sum, Algorithm 1 as it is;
* MAX (``trace-max``): the largest sum. Every k-subset has k(k-1)/2 pairs, so maximising the sum
  of I is minimising the sum of max(I) - I, and Algorithm 1 runs on that; its min-max
  initialisation then keeps the smallest pairwise distance as large as it can.

As DRMI, selection runs per class of the pool's labels with k split evenly, all start vertices
by default (``starts`` for the faster approximate mode), min-sum or min-max initialisation.
``per_class`` reports the Hamming sum of the chosen images (the paper's H for this I).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np

from attacker.selection.base import GuideKind, SelectionResult, Selector, select_per_class
from attacker.selection.drmi import (
    InitMethod,
    check_search_options,
    drmi_subset,
    subset_weight,
)

__all__ = ["TraceMaxSelector", "TraceMinSelector", "TraceSelector", "hamming_matrix"]


class TraceSelector(Selector):
    """Algorithm 1 on Hamming distances of activation traces, per class; see the module."""

    guide: ClassVar[GuideKind | None] = "activations"
    target: ClassVar[Literal["min", "max"]]

    def __init__(
        self, *, init: InitMethod = "min-sum", starts: int | None = None, seed: int = 0
    ) -> None:
        check_search_options(init=init, starts=starts, seed=seed)
        self.init: InitMethod = init
        self.starts = None if starts is None else int(starts)
        self.seed = int(seed)

    @property
    def params(self) -> dict[str, Any]:
        return {"init": self.init, "starts": self.starts, "seed": self.seed}

    def run(
        self, images: np.ndarray, labels: np.ndarray, *, k: int, guide: np.ndarray | None = None
    ) -> SelectionResult:
        assert guide is not None  # Selector.__call__ checked it: guide = "activations"

        def choose(_c: int, members: np.ndarray, k_c: int) -> tuple[np.ndarray, dict[str, Any]]:
            distances = hamming_matrix(guide[members] > 0)
            weights = distances if self.target == "min" else distances.max() - distances
            starts = None if self.starts is None else min(self.starts, len(members))
            subset = drmi_subset(weights, k_c, init=self.init, starts=starts, seed=self.seed)
            return subset.indices, {
                "hamming_sum": subset_weight(distances, subset.indices),
                "start": int(members[subset.start]),
                "swaps": subset.swaps,
            }

        return select_per_class(labels, k, choose)


class TraceMinSelector(TraceSelector):
    """TRACE MIN: the k images per class with the smallest Hamming distance sum."""

    target = "min"


class TraceMaxSelector(TraceSelector):
    """TRACE MAX: the k images per class with the largest Hamming distance sum."""

    target = "max"


def hamming_matrix(patterns: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances (n, n), float64, of binary ``patterns`` (n, units).

    As a matrix product: |a xor b| = |a| + |b| - 2 a.b; float32 sums are exact up to 2^24 units.
    """
    bits = np.asarray(patterns, dtype=np.float32)
    if bits.shape[1] >= 2**24:
        raise ValueError(f"at most 2^24 units fit exact float32 sums, got {bits.shape[1]}")
    counts = bits.sum(axis=1, dtype=np.float64)
    distances = counts[:, None] + counts[None, :] - 2.0 * (bits @ bits.T).astype(np.float64)
    np.fill_diagonal(distances, 0.0)
    return distances
