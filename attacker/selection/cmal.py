"""CMAL: correlation matching (Zheng et al., ICASSP 2017) as the DRMI paper describes it (5.4.1).

With images flattened to vectors x in [0, 1]^d, R(X) = X X^T / m is the (d, d) correlation
matrix of m images, and CMAL picks the k-subset S of the pool D minimising ||R(S) - R(D)||^2
(Frobenius); as every strategy of the paper, per class (D = the class's images, k split
evenly: ``select_per_class``). The paper gives no search procedure; this one is
greedy forward selection (add the image that lowers the objective most) followed by one-for-one
swaps until no swap lowers it (a local optimum), ties to the lowest pool index: deterministic.

Expanding the norm, with G_ij = x_i . x_j,

    ||R(S) - R(D)||^2 = sum_{i,j in S} G_ij^2 / k^2 - 2 sum_{i in S} c_i / k + ||R(D)||^2,
    c_i = x_i^T R(D) x_i,

so a step needs only s_i = sum_{j in S} G_ij^2, updated with one matrix-vector product per image
added or removed: the (n, n) Gram matrix is never formed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from attacker.selection.base import SelectionResult, Selector, select_per_class

__all__ = ["CmalResult", "CmalSelector", "cmal_subset", "correlation_gap"]

logger = logging.getLogger(__name__)

_ROWS = 4096  # rows per block when multiplying the pool by a (d, d) matrix
# A swap must lower the objective by more than this fraction of ||R(D)||^2: well above the
# float32 rounding of the dot products, so rounding noise can never make swaps cycle.
_SWAP_RTOL = 1e-6


@dataclass(frozen=True)
class CmalResult:
    """Chosen pool indices (sorted), their objective ||R(S) - R(D)||^2 and the swaps taken."""

    indices: np.ndarray
    objective: float
    swaps: int


class CmalSelector(Selector):
    """CMAL per class; ``per_class`` reports each class's ||R(S) - R(D)||^2 and swaps."""

    @property
    def params(self) -> dict[str, Any]:
        return {}

    def run(
        self, images: np.ndarray, labels: np.ndarray, *, k: int, guide: np.ndarray | None = None
    ) -> SelectionResult:
        vectors = as_vectors(images)

        def choose(_c: int, members: np.ndarray, k_c: int) -> tuple[np.ndarray, dict[str, Any]]:
            result = cmal_subset(vectors[members], k_c)
            return result.indices, {"objective": result.objective, "swaps": result.swaps}

        return select_per_class(labels, k, choose)


def as_vectors(images: np.ndarray) -> np.ndarray:
    """Images (n, ...) as float32 rows in [0, 1] (uint8 is divided by 255)."""
    vectors = np.asarray(images).reshape(len(images), -1).astype(np.float32)
    if np.asarray(images).dtype == np.uint8:
        vectors /= 255.0
    return vectors


def correlation_gap(vectors: np.ndarray, indices: np.ndarray) -> float:
    """||R(S) - R(D)||^2 straight from the definition, S = ``vectors[indices]``, D = all."""
    x = np.asarray(vectors, dtype=np.float64)
    subset = x[np.asarray(indices)]
    gap = subset.T @ subset / len(subset) - _correlation(x)
    return float(np.sum(gap * gap))


def cmal_subset(vectors: np.ndarray, k: int, *, max_swaps: int | None = None) -> CmalResult:
    """The k rows of ``vectors`` (n, d) whose correlation matrix is closest to all rows'."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or len(x) < 1:
        raise ValueError(f"vectors must have shape (n, d) with n >= 1, got {x.shape}")
    n = len(x)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    r_d = _correlation(x)
    constant = float(np.sum(r_d * r_d))
    c = np.concatenate(
        [
            np.einsum("ij,ij->i", block @ r_d.astype(np.float32), block, dtype=np.float64)
            for block in _blocks(x)
        ]
    )
    norms4 = np.einsum("ij,ij->i", x, x, dtype=np.float64) ** 2  # G_ii^2
    s = np.zeros(n)  # s_i = sum_{j in S} G_ij^2
    in_set = np.zeros(n, dtype=bool)
    total = chosen_c = 0.0  # sum_{i,j in S} G_ij^2 and sum_{i in S} c_i
    for m in range(1, k + 1):  # greedy: the objective of S + {q}, for every outsider q at once
        score = (total + 2 * s + norms4) / m**2 - 2 * (chosen_c + c) / m
        score[in_set] = np.inf
        q = int(score.argmin())
        total += 2 * s[q] + norms4[q]
        chosen_c += c[q]
        in_set[q] = True
        s += _squared_dots(x, q)
    if max_swaps is None:
        max_swaps = max(1000, 10 * k)
    tolerance = _SWAP_RTOL * constant
    swaps = _swap_until_stable(
        x, in_set, s, c, norms4, k=k, tolerance=tolerance, max_swaps=max_swaps
    )
    indices = np.flatnonzero(in_set)
    return CmalResult(indices, correlation_gap(x, indices), swaps)


def _swap_until_stable(
    x: np.ndarray,
    in_set: np.ndarray,
    s: np.ndarray,
    c: np.ndarray,
    norms4: np.ndarray,
    *,
    k: int,
    tolerance: float,
    max_swaps: int,
) -> int:
    """One-for-one swaps (in place on ``in_set`` and ``s``) until none lowers the objective.

    Members are tried in order of what removing them alone would save; for a member p the best
    outsider q is found with one matrix-vector product (s_q loses G_qp^2 when p leaves), and the
    first p with an improving q swaps. Returns the number of swaps.
    """
    if k == len(x):
        return 0
    swaps = 0
    while swaps < max_swaps:
        members = np.flatnonzero(in_set)
        removal_saving = (2 * s[members] - norms4[members]) / k**2 - 2 * c[members] / k
        for p in members[np.argsort(-removal_saving, kind="stable")]:
            with_p = _squared_dots(x, int(p))
            change = (2 * (s - with_p) + norms4) / k**2 - 2 * c / k  # of adding each q ...
            change += (norms4[p] - 2 * s[p]) / k**2 + 2 * c[p] / k  # ... once p has left
            change[in_set] = np.inf
            q = int(change.argmin())
            if change[q] < -tolerance:
                in_set[p], in_set[q] = False, True
                s += _squared_dots(x, q) - with_p
                swaps += 1
                break
        else:
            return swaps  # no member has an improving swap: a local optimum
    logger.warning("CMAL stopped at the cap of %d swaps before a local optimum", max_swaps)
    return swaps


def _correlation(x: np.ndarray) -> np.ndarray:
    """R(D) = X^T X / n in float64, accumulated block by block."""
    r = np.zeros((x.shape[1], x.shape[1]))
    for block in _blocks(x):
        r += (block.T @ block).astype(np.float64)
    return r / len(x)


def _blocks(x: np.ndarray) -> list[np.ndarray]:
    return [x[start : start + _ROWS] for start in range(0, len(x), _ROWS)]


def _squared_dots(x: np.ndarray, i: int) -> np.ndarray:
    """G_{., i}^2 for every row: (x_j . x_i)^2 in float64."""
    return (x @ x[i]).astype(np.float64) ** 2
