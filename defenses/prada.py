"""PRADA (Juuti et al., EuroS&P 2019): flag a client whose query distances stop looking normal.

Benign queries are natural samples, so the distance from each query to the closest earlier query
of the same predicted class is roughly normally distributed; synthetic attack queries (JbDA and
friends: small, fixed-size steps from a few seeds) are not. This is the authors' detector as they
coded it (``growing_set.py`` of their published code), for one client:

* Per predicted class c: a growing set G_c of stored queries, a threshold T_c, the distances
  D_Gc with which members entered G_c, and the list D_c of all min-distances of class c.
* A query x of a new class c starts G_c = [x], T_c = 0, D_Gc = [0]; nothing is added to D_c.
  Otherwise d = min over g in G_c of ||x - g||_2 (float pixels in [0, 1]) is appended to D_c,
  and if d > T_c, x joins G_c, d joins D_Gc and T_c = max(T_c, mean(D_Gc) - std(D_Gc)).
* After every 10th query of the client (the 10th, 20th, ...), D_c is pooled over the classes
  holding at least 10 distances (in the order each class got its first distance, as the authors'
  dict does), values with |v - mean| >= 3 std are dropped (mean and std of the pooled set), and
  if more than 100 values remain the Shapiro-Wilk statistic W is computed: flagged = W < delta.
  Between tests, and when too few values remain, the last verdict stands.

Conventions, checked against the authors' code:

* std is numpy's default population std (ddof=0), in both the threshold rule and the outlier
  rule; the outlier rule keeps values strictly within 3 std.
* Test timing: the authors test when their 0-based query counter is a multiple of 10 (before
  counting the query), i.e. after the 1st, 11th, 21st ... query; this module tests after the
  10th, 20th, 30th ..., as DESIGN.md states the rule. The difference shifts ``first_alarm_at`` by
  at most 9 queries and changes nothing else.
* ``delta`` defaults to 0.95 (``DEFAULT_DELTA``): the authors tuned delta per data set and report
  values of about 0.9-0.96 for MNIST.
* Images are compared at 8-bit precision, the pixel grid of uint8 inputs: a float input x
  (in [0, 1]) is quantised to round(255 x) on arrival (``mlcore.mutual_information.quantise``,
  as the MI detector does), so each pixel moves by at most 0.5/255. For uint8 inputs nothing is
  lost. A distance is then the exact L2 distance of the float pixels k/255: sqrt(S) / 255 with
  S the integer sum of squared pixel differences, computed exactly.

Memory stays bounded: G_c is stored as uint8 rows (784 bytes per MNIST query), and a client's
growing sets hold at most ``max_stored`` queries over all classes (default 20,000, about 16 MB
for MNIST). Past the cap no query joins a growing set any more (G_c, D_Gc and T_c stay as they
are) while every query still gets its distance and the normality test goes on. The first query
of a class that is new after the cap still starts its G_c, so every class keeps its distance
test: the sets hold at most ``max_stored`` + (number of classes - 1) queries. D_c keeps one
float64 per query (8 bytes, as the authors' test pools all of them).

How the min-distance search stays fast and exact: G_c is a uint8 array that doubles its capacity
when full (never beyond the cap), with the exact integer squared norms of its rows beside it. A
class with fewer than ``_MATMUL_MIN_QUERIES`` queries in a batch is searched by a compiled loop
that computes exact integer dot products (so S = |x|^2 - 2 x.g + |g|^2 exactly). A class with
more is searched by one float32 matrix product of its queries against G_c (converted to float32
a cache-sized chunk at a time); every row whose float32 result could, within a worst-case
rounding bound, be the minimum is then recomputed exactly in integers (a handful of rows), so
the result is the exact minimum and a batch gives the same verdicts as query-by-query
observation. Rows added to G_c during the batch are searched by the exact loop.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from defenses.base import DetectorBase, DetectorError, check_fraction, check_int
from mlcore.mutual_information import _jit, quantise

__all__ = ["DEFAULT_DELTA", "DEFAULT_MAX_STORED", "PradaDetector"]

DEFAULT_DELTA = 0.95
DEFAULT_MAX_STORED = 20_000  # stored queries per client and model, over all classes
TEST_EVERY = 10  # queries between two normality tests
MIN_CLASS_DISTANCES = 10  # a class joins the pooled set once it has this many distances
MIN_POOLED = 100  # the test needs strictly more pooled distances than this, after outliers
OUTLIER_STDS = 3.0

_INITIAL_CAPACITY = 16
_EPS32 = float(torch.finfo(torch.float32).eps)
_MATMUL_MIN_QUERIES = 4  # from this many queries of one class in a batch, one matrix product
_CHUNK_ROWS = 256  # rows of G_c converted to float32 at a time for the matrix product
_PRODUCT_BYTES = 8 << 20  # the largest (queries x rows) float32 product computed at once
MAX_PIXELS = (2**31 - 1) // 255**2  # 33,025: exact squared distances and dots fit in int32


class _Floats:
    """A growing float64 array (capacity doubling), appended one value at a time."""

    __slots__ = ("data", "size")

    def __init__(self, values: np.ndarray | None = None) -> None:
        values = np.zeros(0) if values is None else np.asarray(values, dtype=np.float64)
        self.size = len(values)
        self.data = np.empty(max(_INITIAL_CAPACITY, 2 * self.size))
        self.data[: self.size] = values

    def append(self, value: float) -> None:
        if self.size == len(self.data):
            grown = np.empty(2 * len(self.data))
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size] = value
        self.size += 1

    def view(self) -> np.ndarray:
        return self.data[: self.size]


class _ClassState:
    """G_c (uint8 rows and their exact squared norms), T_c, D_Gc and D_c of one class."""

    __slots__ = ("dists", "growing_dists", "max_norm", "norms", "rows", "size", "threshold")

    def __init__(self, rows: np.ndarray, *, growing_dists: np.ndarray, threshold: float) -> None:
        self.size = len(rows)
        self.rows = np.ascontiguousarray(rows, dtype=np.uint8).copy()
        self.norms = _sq_norms(self.rows)
        self.max_norm = int(self.norms.max())
        self.growing_dists = _Floats(growing_dists)
        self.threshold = float(threshold)
        self.dists = _Floats()

    def add(self, row: np.ndarray, norm: int, *, room: int) -> None:
        """Append a row; a full buffer doubles, but by no more than ``room`` rows."""
        if self.size == len(self.rows):
            capacity = min(max(2 * self.size, _INITIAL_CAPACITY), self.size + room)
            rows = np.empty((capacity, self.rows.shape[1]), dtype=np.uint8)
            rows[: self.size] = self.rows[: self.size]
            norms = np.empty(capacity, dtype=np.int64)
            norms[: self.size] = self.norms[: self.size]
            self.rows, self.norms = rows, norms
        self.rows[self.size] = row
        self.norms[self.size] = norm
        self.max_norm = max(self.max_norm, norm)
        self.size += 1

    def trim(self) -> None:
        """Drop unused capacity (once the cap is reached, the set no longer grows)."""
        self.rows = self.rows[: self.size].copy()
        self.norms = self.norms[: self.size].copy()


def _sq_norms(rows: np.ndarray) -> np.ndarray:
    """Exact integer squared norms of uint8 rows."""
    wide = rows.astype(np.int32)
    return np.einsum("ij,ij->i", wide, wide).astype(np.int64)


class PradaDetector(DetectorBase):
    """PRADA for one client's stream; flags when the Shapiro-Wilk W falls below ``delta``.

    ``max_stored`` caps the queries the growing sets hold (see the module docstring).
    """

    name: ClassVar[str] = "prada"
    threshold_setting: ClassVar[str] = "delta"

    def __init__(
        self, *, delta: float = DEFAULT_DELTA, max_stored: int = DEFAULT_MAX_STORED
    ) -> None:
        self.delta = check_fraction("delta", delta)
        self.max_stored = check_int("max_stored", max_stored, low=1)
        super().__init__(threshold=self.delta)
        self._classes: dict[int, _ClassState] = {}  # in order of each class's first query
        self._dist_order: list[int] = []  # classes in order of their first distance
        self._stored = 0  # rows over all growing sets

    # -- observation -------------------------------------------------------------------------

    def _observe(self, x: Tensor, labels: Tensor) -> None:
        if x[0].numel() > MAX_PIXELS:
            raise DetectorError(
                f"PRADA handles images of at most {MAX_PIXELS} values, got {tuple(x.shape[1:])}"
            )
        rows = quantise(x)  # (n, pixels) uint8
        norms = _sq_norms(rows)
        classes = labels.tolist()
        # One matrix product per class with enough queries in the batch, against the rows the
        # class holds already: query -> (rows covered, exact min squared distance to them).
        known: dict[int, tuple[int, int]] = {}
        for c in set(classes):
            state = self._classes.get(c)
            members = [i for i, ci in enumerate(classes) if ci == c]
            if state is None or len(members) < _MATMUL_MIN_QUERIES:
                continue
            mins = _min_sq_by_matmul(state, rows[members], norms[members])
            known.update((i, (state.size, m)) for i, m in zip(members, mins, strict=True))
        for i, c in enumerate(classes):
            state = self._classes.get(c)
            if state is None:
                self._classes[c] = _ClassState(
                    rows[i : i + 1], growing_dists=np.zeros(1), threshold=0.0
                )
                self._stored += 1
            else:
                covered, best = known.get(i, (0, _NO_ROWS))
                if covered < state.size:  # rows not covered by the product (or no product)
                    best = min(best, _min_sq_exact(state, rows[i], int(norms[i]), covered))
                d = math.sqrt(best) / 255.0
                if state.dists.size == 0:
                    self._dist_order.append(c)
                state.dists.append(d)
                if d > state.threshold and self._stored < self.max_stored:
                    state.add(rows[i], int(norms[i]), room=self.max_stored - self._stored)
                    self._stored += 1
                    if self._stored == self.max_stored:
                        for full in self._classes.values():
                            full.trim()
                    state.growing_dists.append(d)
                    gd = state.growing_dists.view()
                    state.threshold = max(state.threshold, float(gd.mean() - gd.std()))
            self.queries_seen += 1
            if self.queries_seen % TEST_EVERY == 0:
                self._test()

    def _test(self) -> None:
        pooled = [
            self._classes[c].dists.view()
            for c in self._dist_order
            if self._classes[c].dists.size >= MIN_CLASS_DISTANCES
        ]
        if not pooled:
            return
        data = np.concatenate(pooled)
        kept = data[np.abs(data - data.mean()) < OUTLIER_STDS * data.std()]
        if len(kept) <= MIN_POOLED:
            return
        from scipy.stats import shapiro  # imported on first use: scipy.stats is slow to import

        with warnings.catch_warnings():
            # N > 5000 makes the p-value approximate; W, the statistic used here, is fine.
            warnings.simplefilter("ignore", UserWarning)
            w = float(shapiro(kept).statistic)
        self._set_verdict(w < self.delta, w)

    # -- state -------------------------------------------------------------------------------

    @property
    def growing_set_sizes(self) -> dict[int, int]:
        """|G_c| per class (the memory PRADA holds for this client)."""
        return {c: s.size for c, s in self._classes.items()}

    def details(self) -> dict[str, int]:
        return {"stored": self._stored, "max_stored": self.max_stored}

    def class_state(self, c: int) -> dict[str, Any]:
        """Diagnostics of class c: D_c, D_Gc, T_c and |G_c| (copies)."""
        s = self._classes[c]
        return {
            "dists": s.dists.view().tolist(),
            "growing_dists": s.growing_dists.view().tolist(),
            "threshold": s.threshold,
            "size": s.size,
        }

    def state_dict(self) -> dict:
        """The state, sharing memory with the detector: rows and distances are only ever
        appended, so the prefixes given out never change (and a snapshot costs no copy)."""
        state = self._base_state()
        state.update(
            classes=list(self._classes),
            growing_sets=[torch.from_numpy(s.rows[: s.size]) for s in self._classes.values()],
            growing_dists=[
                torch.from_numpy(s.growing_dists.view()) for s in self._classes.values()
            ],
            thresholds=[s.threshold for s in self._classes.values()],
            dists=[torch.from_numpy(s.dists.view()) for s in self._classes.values()],
            dist_order=list(self._dist_order),
        )
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a state; a state holding more than ``max_stored`` queries (saved under a
        larger cap) is kept whole, and its sets no longer grow."""
        try:
            self._load_state(state)
        except (KeyError, TypeError, AttributeError, RuntimeError) as exc:
            raise DetectorError(f"not a valid PRADA state: {exc!r}") from exc

    def _load_state(self, state: dict) -> None:
        self._load_base_state(state)
        classes = [int(c) for c in state["classes"]]
        parts = [state[k] for k in ("growing_sets", "growing_dists", "thresholds", "dists")]
        if any(len(p) != len(classes) for p in parts) or len(set(classes)) != len(classes):
            raise DetectorError("PRADA state: per-class lists must match 'classes' one to one")
        pixels = None if self.input_shape is None else math.prod(self.input_shape)
        self._classes = {}
        for c, rows, growing, threshold, dists in zip(classes, *parts, strict=True):
            if rows.ndim != 2 or len(rows) < 1 or rows.shape[1] != pixels:
                raise DetectorError(
                    f"PRADA state: class {c} growing set must be (n >= 1, {pixels}), "
                    f"got {tuple(rows.shape)}"
                )
            if rows.dtype != torch.uint8:
                raise DetectorError(
                    f"PRADA state: class {c} growing set must be uint8, got {rows.dtype}"
                )
            if len(growing) != len(rows):
                raise DetectorError(
                    f"PRADA state: class {c} has {len(rows)} stored queries but "
                    f"{len(growing)} growing-set distances"
                )
            s = _ClassState(
                rows.numpy(), growing_dists=growing.double().numpy(), threshold=float(threshold)
            )
            s.dists = _Floats(dists.double().numpy())
            self._classes[c] = s
        self._stored = sum(s.size for s in self._classes.values())
        self._dist_order = [int(c) for c in state["dist_order"]]
        with_dists = [c for c, s in self._classes.items() if s.dists.size]
        if sorted(self._dist_order) != sorted(with_dists):
            raise DetectorError("PRADA state: 'dist_order' must list the classes with distances")


_NO_ROWS = 1 << 62  # "infinite" squared distance (no row searched yet)


@_jit(parallel=False)
def _min_sq_kernel(row, norm, rows, norms):  # pragma: no cover - compiled by numba
    """Exact min over ``rows`` of |row - g|^2 = |row|^2 - 2 row.g + |g|^2, in integers.

    Pixels are widened to int16 and multiplied as int32 (the pattern the compiler turns into
    pairwise multiply-add SIMD instructions); for uint8 rows of up to ``MAX_PIXELS`` values a
    dot product fits in int32.
    """
    best = _NO_ROWS
    for j in range(rows.shape[0]):
        dot = np.int32(0)
        for k in range(rows.shape[1]):
            dot += np.int32(np.int16(row[k])) * np.int32(np.int16(rows[j, k]))
        sq = norm + norms[j] - 2 * np.int64(dot)
        if sq < best:
            best = sq
    return best


def _min_sq_exact(state: _ClassState, row: np.ndarray, norm: int, lo: int) -> int:
    """Exact min squared distance from ``row`` to rows[lo:] of G_c."""
    return int(_min_sq_kernel(row, norm, state.rows[lo : state.size], state.norms[lo : state.size]))


def _min_sq_by_matmul(state: _ClassState, q: np.ndarray, q_norms: np.ndarray) -> list[int]:
    """Exact min squared distance from each row of ``q`` to all of G_c, by float32 products
    over groups of queries small enough that their (queries x rows) result stays within
    ``_PRODUCT_BYTES`` (a batch of 1,000 against 20,000 rows would otherwise need 80 MB)."""
    group = max(1, _PRODUCT_BYTES // (4 * state.size))
    return [
        best
        for lo in range(0, len(q), group)
        for best in _min_sq_by_product(state, q[lo : lo + group], q_norms[lo : lo + group])
    ]


def _min_sq_by_product(state: _ClassState, q: np.ndarray, q_norms: np.ndarray) -> list[int]:
    """``_min_sq_by_matmul`` for one group of queries, by one float32 product.

    G_c is converted to float32 ``_CHUNK_ROWS`` rows at a time (so the copy stays in cache)
    and multiplied with the queries in torch; ``partial`` = |g|^2 - 2 q.g is the squared
    distance up to |q|^2. Float32 rounding moves it by at most E = 2 (d + 3) eps (|q|^2 +
    max |g|^2) (worst-case dot-product error; pixels are non-negative, so 2 q.g is bounded by
    the norms). Only rows with partial <= min partial + 2E can hold the true minimum; those few
    are recomputed exactly in integers.
    """
    n, pixels = state.size, state.rows.shape[1]
    rows = torch.from_numpy(state.rows)
    queries = torch.from_numpy(q).float()
    partial = np.empty((len(q), n), dtype=np.float32)
    chunk = torch.empty((min(_CHUNK_ROWS, n), pixels), dtype=torch.float32)
    for lo in range(0, n, _CHUNK_ROWS):
        hi = min(n, lo + _CHUNK_ROWS)
        block = chunk[: hi - lo]
        block.copy_(rows[lo:hi])
        partial[:, lo:hi] = (queries @ block.T).numpy()
    partial *= -2.0
    partial += state.norms[:n].astype(np.float32)
    best = []
    for r in range(len(q)):
        slack = 4.0 * (pixels + 3) * _EPS32 * (float(q_norms[r]) + state.max_norm)
        candidates = np.flatnonzero(partial[r] <= float(partial[r].min()) + slack)
        diff = state.rows[candidates].astype(np.int32) - q[r].astype(np.int32)
        best.append(int(np.einsum("ij,ij->i", diff, diff).min()))
    return best
