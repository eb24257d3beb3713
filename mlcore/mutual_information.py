"""Exact pairwise mutual information of images (DRMI paper, Eq. 1), fast.

MI(u, v) = sum_ij P_uv(i, j) log(P_uv(i, j) / (P_u(i) P_v(j))) in nats, with P_uv the joint
histogram of co-located pixel values (one bin per value: 256 for uint8) and 0 log 0 = 0.

Why it is fast: with N pixels and S(h) = sum over the counts c of histogram h of c log c,
MI(u, v) = log N + (S(joint) - S(hist u) - S(hist v)) / N. S(hist u) is computed once per image
and c log c comes from a table, so a pair costs one joint histogram, built from integer counts
(exact, not an approximation). Each image's values are relabelled by rank with its most frequent
value (the background: 0 for MNIST) as rank 0; MI is unchanged and the joint count array
shrinks to K_u x K_v cells (K = distinct values), which stays in cache. Every pixel where both
images show their background falls into cell (0, 0), whose count is N minus the union of the
two foregrounds, so only foreground pixels are visited: u's from a list, v's alone from bit
masks. The count array is incremented over them, then read and reset over the same cells, so it
never needs clearing. Dense images simply visit every pixel. Numba runs the pairs in parallel.
Results are clipped at 0 (MI >= 0; rounding could otherwise give -1e-16, as in sklearn).

Images of any shape (n, ...) are flattened per image: for colour images every channel value at
every position is one "pixel", so Eq. 1 is applied to the joint distribution of co-located
channel values (the paper only uses grey-scale images).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numba
import numpy as np

__all__ = [
    "mutual_information_cross",
    "mutual_information_matrix",
    "mutual_information_pair",
    "quantise",
]


def _jit(*, parallel: bool):
    """``njit(cache=True)``, without the cache when no cache directory is writable."""

    def wrap(func):
        try:
            return numba.njit(cache=True, nogil=True, parallel=parallel)(func)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(nogil=True, parallel=parallel)(func)

    return wrap


# numba's default "workqueue" threading layer aborts the process when two Python threads launch
# parallel kernels at the same time (e.g. a web server's thread pool), so launches are serialised.
_KERNEL_LOCK = threading.Lock()


def _check_bins(bins: int) -> None:
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or not 2 <= bins <= 256:
        raise ValueError(f"bins must be in 2..256, got {bins}")


def quantise(images: Any, *, bins: int = 256) -> np.ndarray:
    """Return the (n, d) uint8 bin index of every pixel of ``n`` images of any shape (n, ...).

    Accepts numpy arrays or torch tensors. Integer images must hold values 0..255 and are used
    as is; float images must lie in [0, 1] and become round(255 x). ``bins`` < 256 coarsens a
    value to value * bins // 256.
    """
    _check_bins(bins)
    if hasattr(images, "detach"):  # torch tensor, without importing torch
        images = images.detach().cpu()
        if images.is_floating_point() and images.element_size() < 4:  # numpy has no bfloat16
            images = images.float()
    x = np.asarray(images)
    if x.ndim < 2 or x.shape[0] < 1 or x[0].size < 1:
        raise ValueError(f"images must have shape (n, ...) with n >= 1 and pixels, got {x.shape}")
    x = x.reshape(x.shape[0], -1)
    if x.dtype.kind == "f":
        if not np.isfinite(x).all():
            raise ValueError(f"float images must be finite, got {x[~np.isfinite(x)][0]}")
        if x.min() < 0.0 or x.max() > 1.0:
            raise ValueError(
                f"float images must lie in [0, 1] (cast 0..255 images to uint8), "
                f"got range [{x.min()}, {x.max()}]"
            )
        x = np.rint(x * 255.0).astype(np.uint8)
    elif x.dtype.kind in "biu":
        if x.dtype != np.uint8 and (x.min() < 0 or x.max() > 255):
            raise ValueError(f"integer images must lie in 0..255, got [{x.min()}, {x.max()}]")
        x = x.astype(np.uint8, copy=False)
    else:
        raise ValueError(f"images must be an integer or float array, got dtype {x.dtype}")
    if bins < 256:
        x = (x.astype(np.uint16) * bins // 256).astype(np.uint8)
    return np.ascontiguousarray(x)


_DEBRUIJN = np.uint64(0x03F79D71B4CB0A89)  # (lowest set bit * this) >> 58 -> unique slot
_BIT_INDEX = np.zeros(64, dtype=np.int64)
_BIT_INDEX[[((1 << b) * int(_DEBRUIJN) % 2**64) >> 58 for b in range(64)]] = np.arange(64)


@_jit(parallel=False)
def _rank_images(q, bins, table):
    """Relabel each image's values by rank, its background (most frequent value) first.

    MI does not change under a one-to-one relabelling of either image, and ranks keep the joint
    count array as small as K_u x K_v (K = number of distinct values), so it stays in cache.
    Returns ranks, K per image, foreground pixel lists (CSR ptr, idx), foreground bit masks and
    S(hist) = sum c log c per image.
    """
    n, d = q.shape
    ranks, n_values, s = np.empty_like(q), np.empty(n, np.int64), np.empty(n)
    ptr, masks = np.zeros(n + 1, np.int64), np.zeros((n, (d + 63) // 64), np.uint64)
    h, lut = np.zeros(bins, np.int64), np.zeros(bins, np.uint8)
    for i in range(n):
        h[:] = 0
        for p in range(d):
            h[q[i, p]] += 1
        background = np.argmax(h)
        acc, rank = 0.0, 1
        for value in range(bins):
            acc += table[h[value]]
            if h[value] > 0 and value != background:
                lut[value] = rank
                rank += 1
        lut[background] = 0
        n_values[i], s[i], ptr[i + 1] = rank, acc, ptr[i] + d - h[background]
        for p in range(d):
            ranks[i, p] = lut[q[i, p]]
    idx = np.empty(ptr[n], np.int32)
    for i in range(n):
        k = ptr[i]
        for p in range(d):
            if ranks[i, p]:
                idx[k] = p
                k += 1
                masks[i, p >> 6] |= np.uint64(1) << np.uint64(p & 63)
    return ranks, n_values, ptr, idx, masks, s


def _prepare(images: Any, bins: int) -> tuple[np.ndarray, ...]:
    """Quantised, then ranked images and what the kernels need (see ``_rank_images``)."""
    q = quantise(images, bins=bins)
    return _rank_images(q, bins, _xlogx_table(q.shape[1]))


def _xlogx_table(d: int) -> np.ndarray:
    c = np.arange(d + 1, dtype=np.float64)
    return c * np.log(np.maximum(c, 1.0))


@_jit(parallel=False)
def _pair_mi(ra, ka, pa, ia, ma, sa, i, rb, kb, pb, ib, mb, sb, j, table, bit_index, count, cells):
    """MI(image i of a, image j of b); ``count`` is all zeros on entry and on exit."""
    u, v, kv = ra[i], rb[j], kb[j]
    m = 0
    for k in range(pa[i], pa[i + 1]):  # foreground of u: cell (u_p, v_p)
        p = ia[k]
        c = np.int32(u[p]) * kv + v[p]
        count[c] += 1
        cells[m] = c
        m += 1
    mu, mv = ma[i], mb[j]
    for w in range(mu.shape[0]):  # foreground of v only: cell (0, v_p)
        bits = mv[w] & ~mu[w]
        while bits:
            low = bits & (~bits + np.uint64(1))
            bits ^= low
            p = w * 64 + bit_index[(low * _DEBRUIJN) >> np.uint64(58)]
            c = v[p]
            count[c] += 1
            cells[m] = c
            m += 1
    n_pixels = u.shape[0]
    s = table[n_pixels - m]  # cell (0, 0): the pixels in neither foreground
    for k in range(m):  # read each touched cell once (later visits read 0) and reset it
        c = cells[k]
        s += table[count[c]]
        count[c] = 0
    return max(math.log(n_pixels) + (s - sa[i] - sb[j]) / n_pixels, 0.0)


@_jit(parallel=True)
def _matrix_kernel(r, k, ptr, idx, masks, s, table, bit_index, counts, cells, out):
    n = r.shape[0]
    half, n_chunks = (n + 1) // 2, counts.shape[0]
    for chunk in numba.prange(n_chunks):
        count, cell = counts[chunk], cells[chunk]
        for row in range(chunk, half, n_chunks):  # rows row and n-1-row: equal work
            for i in (row, n - 1 - row):
                for j in range(i + 1, n):
                    out[i, j] = _pair_mi(
                        r, k, ptr, idx, masks, s, i, r, k, ptr, idx, masks, s, j,
                        table, bit_index, count, cell,
                    )  # fmt: skip
                if row == n - 1 - row:  # middle row of an odd n
                    break


@_jit(parallel=False)
def _mirror(out):
    """Copy the upper triangle into the lower one, tile by tile (cache friendly)."""
    n, tile = out.shape[0], 64
    for bi in range(0, n, tile):
        for bj in range(bi, n, tile):
            for i in range(bi, min(bi + tile, n)):
                for j in range(max(i + 1, bj), min(bj + tile, n)):
                    out[j, i] = out[i, j]


@_jit(parallel=True)
def _cross_kernel(ra, ka, pa, ia, ma, sa, rb, kb, pb, ib, mb, sb, table, bit_index, counts,
                  cells, out, transpose):  # fmt: skip
    na, nb, n_chunks = ra.shape[0], rb.shape[0], counts.shape[0]
    for chunk in numba.prange(n_chunks):
        count, cell = counts[chunk], cells[chunk]
        for i in range(chunk, na, n_chunks):
            for j in range(nb):
                mi = _pair_mi(
                    ra, ka, pa, ia, ma, sa, i, rb, kb, pb, ib, mb, sb, j,
                    table, bit_index, count, cell,
                )  # fmt: skip
                if transpose:
                    out[j, i] = mi
                else:
                    out[i, j] = mi


def _scratch(rows: int, a: tuple, b: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Per work item (a few per thread): a K_u x K_v count array and a touched-cell list."""
    n_chunks = max(1, min(rows, 8 * numba.get_num_threads()))
    d = a[0].shape[1]
    dtype = np.uint16 if d < 2**16 else np.int32  # counts never exceed d
    counts = np.zeros((n_chunks, int(a[1].max()) * int(b[1].max())), dtype=dtype)
    return counts, np.empty((n_chunks, 2 * d), dtype=np.int32)


def mutual_information_matrix(images: Any, *, bins: int = 256) -> np.ndarray:
    """(n, n) float64 matrix of MI(u, v) in nats between all images, symmetric.

    The diagonal is set to 0: the paper never uses MI(u, u) (that is the entropy H(u); get it
    from ``mutual_information_cross(u[None], u[None])`` if needed).
    """
    prep = _prepare(images, bins)
    n, d = prep[0].shape
    out = np.zeros((n, n))
    scratch = _scratch((n + 1) // 2, prep, prep)
    with _KERNEL_LOCK:
        _matrix_kernel(*prep, _xlogx_table(d), _BIT_INDEX, *scratch, out)
        _mirror(out)
    return out


def mutual_information_cross(a: Any, b: Any, *, bins: int = 256) -> np.ndarray:
    """(len(a), len(b)) float64 matrix of MI in nats between every image of a and of b."""
    pa, pb = _prepare(a, bins), _prepare(b, bins)
    (na, d), (nb, db) = pa[0].shape, pb[0].shape
    if d != db:
        raise ValueError(f"a and b must have the same image size, got {d} and {db} pixels")
    out = np.empty((na, nb))
    transpose = na < nb  # parallelise over the longer side; MI is symmetric
    if transpose:
        pa, pb = pb, pa
    scratch = _scratch(max(na, nb), pa, pb)
    with _KERNEL_LOCK:
        _cross_kernel(*pa, *pb, _xlogx_table(d), _BIT_INDEX, *scratch, out, transpose)
    return out


def mutual_information_pair(u: Any, v: Any, *, bins: int = 256) -> float:
    """MI in nats of two images: Eq. 1 written out with numpy, the per-pair reference."""
    qu, qv = (
        quantise(x[None] if hasattr(x, "detach") else np.asarray(x)[None], bins=bins)[0]
        for x in (u, v)
    )
    if qu.size != qv.size:
        raise ValueError(f"u and v must have the same size, got {qu.size} and {qv.size} pixels")
    joint = np.bincount(qu.astype(np.intp) * bins + qv, minlength=bins * bins) / qu.size
    joint = joint.reshape(bins, bins)
    i, j = np.nonzero(joint)
    p_uv = joint[i, j]
    mi = np.sum(p_uv * np.log(p_uv / (joint.sum(axis=1)[i] * joint.sum(axis=0)[j])))
    return max(float(mi), 0.0)
