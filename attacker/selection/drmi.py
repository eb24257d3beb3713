"""DRMI: pick the k least mutually-redundant samples of a pool (DRMI paper, Section 4).

The pool is a complete graph whose edge weights are I[u][v] = MI(u, v)^alpha (Eq. 1-2); DRMI
looks for the k-vertex induced subgraph with the smallest weight sum
H = 1/2 sum_{i != j in S} I[i][j] (Eq. 3-4), an NP-complete problem, with the paper's heuristic:

* Algorithm 2, greedy-choice initialisation from a start vertex t: S0 = {t}, f = I[t]; k - 1
  times add the outside vertex with the smallest f, then fold its row into f with + ("min-sum",
  Eq. 7) or max ("min-max", Eq. 8).
* Algorithm 3, one-hot replacement: p = the member with the largest In (its weight to the rest
  of S), q = the outsider with the smallest Out[q] - I[p][q]; swap them while that lowers H
  (Eq. 10). Only the single worst p is ever tried, as in the paper.
* Algorithm 1: run both from every vertex t and keep the smallest H (ties: smallest t).

How this code does it (same results as the paper's loops, checked against a plain loop version
in tests/attacker/test_selection.py):

* The diagonal is zeroed once, so In and Out collapse into one array sums[v] = sum_{j in S} I[v][j]
  that a swap updates with one rank-one step, sums += I[q] - I[p] (the paper's lines 13-16).
* Start vertices run as batches of rows (starts_per_chunk, n). The cost is reading one row of I
  per greedy step per start, so memory bandwidth is the limit: chunks are kept small enough to stay
  in cache, and Algorithm 3 starts from the sums the greedy phase already built instead of
  re-reading k rows per set.
* Algorithm 3 depends only on the set (ties go to the lowest vertex index), so starts of a chunk
  that reach the same S0 share one run. Sets need different numbers of swaps; finished sets leave
  the batch.
* A swap must lower H by more than a tiny relative tolerance, so float ties cannot make it cycle;
  a swap cap guards the loop anyway and logs a warning if it is ever hit.
* The reported H is recomputed from the final set, not the running incremental value.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from attacker.selection.base import SelectionResult, Selector, check_int, select_per_class

__all__ = [
    "DrmiSelector",
    "InitMethod",
    "SubsetResult",
    "check_search_options",
    "drmi_subset",
    "subset_weight",
]

logger = logging.getLogger(__name__)

InitMethod = Literal["min-sum", "min-max"]
INIT_METHODS: tuple[InitMethod, ...] = ("min-sum", "min-max")

# A swap is taken only if it lowers H by more than this fraction of In[p] (float ties never swap).
_SWAP_RTOL = 1e-10
# Bytes of one (starts_per_chunk, n) float64 work array. Small on purpose: the batch then stays
# in cache while rows of I stream in (at n = 6000, 2-4 MB chunks ran 2-3x faster than 32 MB ones).
_CHUNK_BYTES = 2 * 2**20


@dataclass(frozen=True)
class SubsetResult:
    """The chosen vertices (sorted), their H (Eq. 3), the winning start and its swap count."""

    indices: np.ndarray
    H: float
    start: int
    swaps: int


class DrmiSelector(Selector):
    """DRMI per class: MI matrix of the class's images, I = MI^alpha, then ``drmi_subset``.

    k is split evenly over the classes (``split_budget``), as the paper picks the same number of
    samples per label. ``per_class[c]`` reports k, n, H, the winning start (a pool index) and
    its swap count. ``progress`` receives one line per step, for CLIs that show progress.

    The MI matrix is the expensive part and does not depend on alpha, init or k: selectors that
    share one ``mi_cache`` dict (benchmarks sweeping those) compute it once per class.
    """

    def __init__(
        self,
        *,
        alpha: float = 2.0,
        init: InitMethod = "min-sum",
        bins: int = 256,
        starts: int | None = None,
        seed: int = 0,
        progress: Callable[[str], None] | None = None,
        mi_cache: dict[tuple, np.ndarray] | None = None,
    ) -> None:
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float, np.floating, np.integer))
            or not math.isfinite(alpha)
            or alpha <= 0
        ):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        check_search_options(init=init, starts=starts, seed=seed)
        check_int("bins", bins)
        if not 2 <= bins <= 256:
            raise ValueError(f"bins must be in 2..256, got {bins}")
        self.alpha = float(alpha)
        self.init: InitMethod = init
        self.bins = int(bins)
        self.starts = None if starts is None else int(starts)
        self.seed = int(seed)
        self.progress = progress
        self.mi_cache = mi_cache

    @property
    def params(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "init": self.init,
            "bins": self.bins,
            "starts": self.starts,
            "seed": self.seed,
        }

    def run(
        self, images: np.ndarray, labels: np.ndarray, *, k: int, guide: np.ndarray | None = None
    ) -> SelectionResult:
        def choose(c: int, members: np.ndarray, k_c: int) -> tuple[np.ndarray, dict[str, Any]]:
            weights = self._mutual_information(c, images[members])
            if self.mi_cache is not None:
                weights = weights.copy()  # keep the cached MI untouched
            np.power(weights, self.alpha, out=weights)  # Eq. 2, in place: n x n can be large
            starts = None if self.starts is None else min(self.starts, len(members))
            subset = drmi_subset(weights, k_c, init=self.init, starts=starts, seed=self.seed)
            del weights
            self._report(
                f"DRMI class {c}: chose {k_c} of {len(members)}, H={subset.H:.6g} "
                f"after {subset.swaps} swaps"
            )
            start = int(members[subset.start])
            return subset.indices, {"H": subset.H, "start": start, "swaps": subset.swaps}

        return select_per_class(labels, k, choose)

    def _mutual_information(self, label: int, images: np.ndarray) -> np.ndarray:
        """The class's MI matrix, from ``mi_cache`` when the same images were seen before."""
        from mlcore.mutual_information import mutual_information_matrix

        cache = self.mi_cache
        digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
        key = (label, self.bins, digest)
        if cache is not None and key in cache:
            return cache[key]
        self._report(f"DRMI class {label}: mutual information of {len(images)} images")
        matrix = mutual_information_matrix(images, bins=self.bins)
        if cache is not None:
            cache[key] = matrix
        return matrix

    def _report(self, message: str) -> None:
        logger.info("%s", message)
        if self.progress is not None:
            self.progress(message)


def drmi_subset(
    weights: np.ndarray,
    k: int,
    *,
    init: InitMethod = "min-sum",
    starts: int | None = None,
    seed: int = 0,
) -> SubsetResult:
    """Algorithm 1: the k-subset of minimal H found from every start vertex (or ``starts`` ones).

    ``weights`` is the symmetric (n, n) matrix I = MI^alpha; its diagonal is ignored.
    ``starts=None`` is the paper's exact mode (all n start vertices); ``starts=m`` tries m start
    vertices drawn with ``seed``, which is faster and usually as good.
    """
    w = _as_weight_matrix(weights)
    n = w.shape[0]
    check_int("k", k)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    if init not in INIT_METHODS:
        raise ValueError(f"init must be 'min-sum' or 'min-max', got {init!r}")
    if starts is not None:
        check_int("starts", starts)
        if not 1 <= starts <= n:
            raise ValueError(f"starts must be in 1..{n} (or None for all), got {starts}")
    check_int("seed", seed)
    if k == n:
        everything = np.arange(n)
        return SubsetResult(everything, subset_weight(w, everything), start=0, swaps=0)

    began = time.perf_counter()
    if starts is None or starts == n:
        start_vertices = np.arange(n)
    else:
        start_vertices = np.sort(np.random.default_rng(seed).choice(n, size=starts, replace=False))

    best: SubsetResult | None = None
    distinct_sets = 0
    chunk = _starts_per_chunk(n)
    for lo in range(0, len(start_vertices), chunk):
        t = start_vertices[lo : lo + chunk]
        initial, sums = _greedy_init(w, t, k, init=init)
        initial.sort(axis=1)
        # np.unique keeps the first occurrence; starts are ascending, so that is the smallest start.
        distinct, first = np.unique(initial, axis=0, return_index=True)
        distinct_sets += len(distinct)
        final, h, swaps = _one_hot_replacement(w, distinct, sums[first])
        i = int(np.lexsort((t[first], h))[0])  # smallest H, then smallest start
        if best is None or h[i] < best.H:  # strict: an equal H from a later start loses
            best = SubsetResult(final[i].copy(), float(h[i]), int(t[first[i]]), int(swaps[i]))
    assert best is not None  # at least one start vertex always runs
    logger.debug(
        "DRMI n=%d k=%d init=%s: %d starts (%d distinct initial sets within chunks), H=%.6g "
        "from start %d after %d swaps, %.2fs",
        n, k, init, len(start_vertices), distinct_sets, best.H, best.start, best.swaps,
        time.perf_counter() - began,
    )  # fmt: skip
    return best


def subset_weight(weights: np.ndarray, indices: np.ndarray) -> float:
    """H of Eq. 3 for one subset: half the sum of the off-diagonal weights among ``indices``."""
    idx = np.asarray(indices, dtype=np.intp)
    block = np.asarray(weights, dtype=np.float64)[np.ix_(idx, idx)]
    return float(0.5 * (block.sum() - np.trace(block)))


def check_search_options(*, init: object, starts: object, seed: object) -> None:
    """Check Algorithm 1's options (DRMI's and TRACE's): init, start vertices, seed."""
    if init not in INIT_METHODS:
        raise ValueError(f"init must be 'min-sum' or 'min-max', got {init!r}")
    if starts is not None and check_int("starts", starts) < 1:
        raise ValueError(f"starts must be >= 1 (or None for all), got {starts}")
    check_int("seed", seed)


def _as_weight_matrix(weights: np.ndarray) -> np.ndarray:
    """Validated float64 copy with a zero diagonal (so In and Out share one formula)."""
    w = np.array(weights, dtype=np.float64, copy=True)
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] < 1:
        raise ValueError(f"weights must be a non-empty square (n, n) matrix, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("weights must be finite, got NaN or inf")
    np.fill_diagonal(w, 0.0)
    if w.min() < 0.0:
        raise ValueError(f"weights must be non-negative, got minimum {w.min()}")
    if not np.array_equal(w, w.T):  # exact symmetry is the common case and cheap to check
        gap = scale = 0.0
        for lo in range(0, len(w), 256):  # row blocks: no n x n temporaries
            gap = max(gap, float(np.abs(w[lo : lo + 256] - w[:, lo : lo + 256].T).max()))
            scale = max(scale, float(w[lo : lo + 256].max()))
        if gap > 1e-9 * scale:
            raise ValueError(
                f"weights must be symmetric (an undirected graph), got max |W - W.T| = {gap}"
            )
    return w


def _starts_per_chunk(n: int) -> int:
    return max(1, _CHUNK_BYTES // (8 * n))


def _greedy_init(
    weights: np.ndarray, start_vertices: np.ndarray, k: int, *, init: InitMethod = "min-sum"
) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 2 for a batch of starts: (vertices in the order added, sums) per start.

    ``sums[b, v] = sum_{j in S0_b} I[v][j]`` (the In/Out arrays Algorithm 3 starts from).
    ``weights`` must come from ``_as_weight_matrix``. Members of S0 carry f = inf, which + and
    max keep, so one argmin per step finds p' among the outsiders (ties: lowest index).
    """
    start_vertices = np.asarray(start_vertices, dtype=np.intp)
    rows = np.arange(len(start_vertices))
    chosen = np.empty((len(start_vertices), k), dtype=np.intp)
    chosen[:, 0] = start_vertices
    f = weights[start_vertices]
    min_sum = init == "min-sum"
    # min-sum: f is the sum itself, but the inf markers hide the members' own In values, so
    # those are collected from rows already in cache rather than re-read from I afterwards.
    sums = f if min_sum else f.copy()
    members_in = np.zeros((len(start_vertices), k))
    f[rows, start_vertices] = np.inf
    added_row = np.empty_like(f)
    for step in range(1, k):
        p = f.argmin(axis=1)
        chosen[:, step] = p
        np.take(weights, p, axis=0, out=added_row)
        if min_sum:
            members_in[:, step] = f[rows, p]
            members_in[:, :step] += np.take_along_axis(added_row, chosen[:, :step], axis=1)
            f += added_row
        else:
            np.maximum(f, added_row, out=f)
            sums += added_row
        f[rows, p] = np.inf
    if min_sum:
        np.put_along_axis(sums, chosen, members_in, axis=1)
    return chosen, sums


def _one_hot_replacement(
    weights: np.ndarray,
    initial_sets: np.ndarray,
    sums: np.ndarray | None = None,
    *,
    max_swaps: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Algorithm 3 for a batch of initial sets: (final sets sorted, H, swap count) per set.

    ``weights`` must come from ``_as_weight_matrix``; ``sums`` (as from ``_greedy_init``) saves
    re-reading k rows of it per set. Each set swaps until its own stopping rule fires.
    """
    n = weights.shape[0]
    sets = np.sort(np.asarray(initial_sets, dtype=np.intp), axis=1)
    m, k = sets.shape
    if k == n:
        return sets, _subset_weights(weights, sets), np.zeros(m, dtype=np.int64)
    if max_swaps is None:
        max_swaps = max(1000, 100 * k)  # the paper observes fewer than 10 k swaps
    if sums is None:
        sums = np.zeros((m, n))
        for j in range(k):
            sums += weights[sets[:, j]]
    else:
        sums = np.array(sums, dtype=np.float64, copy=True)
    final = np.empty_like(sets)
    swap_counts = np.zeros(m, dtype=np.int64)
    ids = np.arange(m)  # which input set each remaining row is
    swaps = np.zeros(m, dtype=np.int64)
    while len(ids):
        rows = np.arange(len(ids))
        member_sums = np.take_along_axis(sums, sets, axis=1)  # In[t], t in S (sorted: ties low)
        slot = member_sums.argmax(axis=1)
        in_p = member_sums[rows, slot]
        p = sets[rows, slot]
        w_p = weights[p]
        candidate = sums - w_p  # Out[j] - I[p][j], j outside S
        np.put_along_axis(candidate, sets, np.inf, axis=1)
        q = candidate.argmin(axis=1)
        out_q = candidate[rows, q]
        improves = (in_p > 0.0) & (in_p - out_q > _SWAP_RTOL * in_p)
        capped = improves & (swaps >= max_swaps)
        if capped.any():
            logger.warning(
                "one-hot replacement hit its cap of %d swaps for %d set(s); keeping their "
                "current sets, which are valid and lower H than their start",
                max_swaps, int(capped.sum()),
            )  # fmt: skip
            improves &= ~capped
        if not improves.all():
            done = ~improves
            final[ids[done]] = sets[done]
            swap_counts[ids[done]] = swaps[done]
            ids, sets, sums, swaps = ids[improves], sets[improves], sums[improves], swaps[improves]
            slot, q, w_p = slot[improves], q[improves], w_p[improves]
            rows = rows[: len(ids)]
        sets[rows, slot] = q
        sums -= w_p
        sums += weights[q]
        swaps += 1
        sets.sort(axis=1)  # keep members ascending so argmax ties go to the lowest vertex
    # Sets often converge to the same final set: compute each distinct set's H once.
    distinct, inverse = np.unique(final, axis=0, return_inverse=True)
    return final, _subset_weights(weights, distinct)[inverse.ravel()], swap_counts


def _subset_weights(weights: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """H of every row of ``sets`` (zero-diagonal weights), recomputed from scratch."""
    m, k = sets.shape
    h = np.empty(m)
    per_chunk = max(1, _CHUNK_BYTES // (8 * k * k))
    for lo in range(0, m, per_chunk):
        s = sets[lo : lo + per_chunk]
        h[lo : lo + len(s)] = 0.5 * weights[s[:, :, None], s[:, None, :]].sum(axis=(1, 2))
    return h
