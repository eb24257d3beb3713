"""The DRMI paper's comparison strategies (Section 5.4): CMAL, HCP / LCP, K-means,
PCA + K-means, TRACE MIN / MAX, their guides, and ``attacker select`` with them."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from attacker.cli import app
from attacker.selection import SELECTORS, Selection, make_selector
from attacker.selection.cmal import _SWAP_RTOL, as_vectors, cmal_subset, correlation_gap
from attacker.selection.guides import (
    activations_from_model,
    guide_from_checkpoint,
    probabilities_from_model,
)
from attacker.selection.kmeans import nearest_to_centroids
from attacker.selection.trace import hamming_matrix
from mlcore.architectures import build_model
from mlcore.checkpoints import save_checkpoint

PAPER_METHODS = ["cmal", "hcp", "lcp", "kmeans", "pca-kmeans", "trace-min", "trace-max"]


def pool(seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """60 random 8x8 images in 3 classes of 30 / 20 / 10, and a guide of each kind."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(60, 8, 8), dtype=np.uint8)
    labels = rng.permutation(np.repeat([0, 1, 2], [30, 20, 10]))
    guides = {
        "probabilities": rng.dirichlet(np.ones(3), size=60),
        "activations": rng.random((60, 40)) < 0.4,
    }
    return images, labels, guides


def build(method: str, seed: int = 0) -> Any:
    params = {"seed": seed} if "kmeans" in method or "trace" in method else {}
    return make_selector(method, **params)


def select(method: str, k: int, seed: int = 0, pool_seed: int = 0) -> np.ndarray:
    images, labels, guides = pool(pool_seed)
    selector = build(method, seed)
    guide = None if selector.guide is None else guides[selector.guide]
    return selector(images, labels, k=k, guide=guide).indices


@pytest.mark.parametrize("method", PAPER_METHODS)
@pytest.mark.parametrize("k", [1, 7, 31, 60])
def test_each_returns_exactly_k_distinct_pool_indices_repeatably(method: str, k: int) -> None:
    chosen = select(method, k)
    assert len(chosen) == k and len(set(chosen.tolist())) == k
    assert chosen.min() >= 0 and chosen.max() < 60
    np.testing.assert_array_equal(chosen, select(method, k))  # same seed, same pool: same choice


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_each_splits_k_evenly_over_the_classes_as_the_paper_selects(method: str) -> None:
    images, labels, guides = pool()
    selector = build(method)
    guide = None if selector.guide is None else guides[selector.guide]
    result = selector(images, labels, k=31, guide=guide)
    counts = {c: int((labels[result.indices] == c).sum()) for c in (0, 1, 2)}
    assert counts == {c: info["k"] for c, info in result.per_class.items()} == {0: 11, 1: 10, 2: 10}


def test_registry_knows_every_paper_method_and_round_trips_params() -> None:
    assert set(PAPER_METHODS) <= set(SELECTORS)
    for method in PAPER_METHODS:
        selector = build(method, seed=3)
        assert make_selector(method, **selector.params).params == selector.params
    assert SELECTORS["cmal"].guide is None
    assert {SELECTORS[m].guide for m in ("hcp", "lcp", "kmeans", "pca-kmeans")} == {"probabilities"}
    assert {SELECTORS[m].guide for m in ("trace-min", "trace-max")} == {"activations"}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: make_selector("trace-mid"), "'trace-mid'.*known: .*trace-max, trace-min"),
        (lambda: make_selector("cmal", seed=1), "bad parameters for selection method 'cmal'"),
        (lambda: select("cmal", 61), "k must be in 1..60, got 61"),
        (lambda: select("hcp", 61), "k must be in 1..60, got 61"),
        (lambda: select("trace-max", 0), "k must be in 1..60, got 0"),
        (lambda: build("kmeans")(*pool()[:2], k=5), "needs a guide: class probabilities"),
        (lambda: build("trace-min")(*pool()[:2], k=5), "needs a guide: activation patterns"),
        (lambda: make_selector("kmeans", seed="x"), "seed must be an integer"),
        (lambda: make_selector("pca-kmeans", components=0), "components must be .* got 0"),
        (lambda: make_selector("pca-kmeans", components=1.5), "got 1.5"),
        (lambda: make_selector("trace-min", init="max-sum"), "'max-sum'"),
        (lambda: make_selector("trace-max", starts=0), "starts must be >= 1 .* got 0"),
        (lambda: cmal_subset(np.zeros((4, 2)), 5), "k must be in 1..4, got 5"),
    ],
)
def test_bad_input_raises_value_error_naming_the_value(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_pca_kmeans_refuses_more_components_than_classes() -> None:
    images, labels, guides = pool()
    with pytest.raises(ValueError, match=r"components must be at most 3 .* got 4"):
        make_selector("pca-kmeans", components=4)(
            images, labels, k=5, guide=guides["probabilities"]
        )


# --- CMAL ------------------------------------------------------------------------------------


def digit_vectors(digit: int, n: int) -> np.ndarray:
    digits = load_digits()
    return as_vectors((digits.images[digits.target == digit][:n] * 15).astype(np.uint8))


def test_cmal_objective_is_below_every_random_subset_of_the_same_pool() -> None:
    x = digit_vectors(3, 150)
    result = cmal_subset(x, 15)
    assert result.objective == pytest.approx(correlation_gap(x, result.indices))
    rng = np.random.default_rng(0)
    random_gaps = [correlation_gap(x, rng.choice(150, 15, replace=False)) for _ in range(200)]
    assert result.objective < min(random_gaps), (result.objective, min(random_gaps))


def test_cmal_selector_beats_random_selector_in_every_class() -> None:
    digits = load_digits()
    keep = np.isin(digits.target, [0, 1, 2])
    images, labels = (digits.images[keep] * 15).astype(np.uint8), digits.target[keep]
    cmal = make_selector("cmal")(images, labels, k=30)
    random = make_selector("random", seed=0)(images, labels, k=30)
    vectors = as_vectors(images)

    def class_gap(chosen: np.ndarray, c: int) -> float:
        members = np.flatnonzero(labels == c)
        return correlation_gap(
            vectors[members], np.searchsorted(members, chosen[labels[chosen] == c])
        )

    for c in (0, 1, 2):
        cmal_gap, random_gap = class_gap(cmal.indices, c), class_gap(random.indices, c)
        assert cmal.per_class[c]["objective"] == pytest.approx(cmal_gap)
        assert cmal_gap < random_gap, (c, cmal_gap, random_gap)


def test_cmal_ends_where_no_single_swap_lowers_the_objective() -> None:
    x = digit_vectors(5, 25)
    result = cmal_subset(x, 6)
    tolerance = _SWAP_RTOL * float(np.sum((x.T.astype(np.float64) @ x / len(x)) ** 2))
    inside, outside = result.indices.tolist(), sorted(set(range(25)) - set(result.indices.tolist()))
    best_swap = min(
        correlation_gap(x, [*(i for i in inside if i != p), q])
        for p, q in itertools.product(inside, outside)
    )
    assert best_swap >= result.objective - tolerance
    greedy_only = cmal_subset(x, 6, max_swaps=0)
    assert result.objective <= greedy_only.objective


# --- HCP / LCP -------------------------------------------------------------------------------


def test_hcp_and_lcp_order_by_the_confidence_of_the_own_label_correct_first() -> None:
    # one class; image 3 is misclassified (its label 0 is not the row's maximum)
    probabilities = np.array(
        [[0.9, 0.1], [0.6, 0.4], [0.5, 0.5], [0.3, 0.7], [0.99, 0.01], [0.55, 0.45]]
    )
    labels = np.zeros(6, dtype=np.int64)
    images = np.zeros((6, 2, 2), dtype=np.uint8)

    def chosen(method: str, k: int) -> list[int]:
        return make_selector(method)(images, labels, k=k, guide=probabilities).indices.tolist()

    assert chosen("hcp", 2) == [0, 4]
    assert chosen("lcp", 2) == [2, 5]  # 0.5 (a tie counts as correct), then 0.55
    assert chosen("lcp", 5) == [0, 1, 2, 4, 5]  # every correct one before the misclassified
    assert chosen("lcp", 6) == list(range(6))
    result = make_selector("lcp")(images, labels, k=6, guide=probabilities)
    assert result.per_class[0]["misclassified"] == 1
    assert result.per_class[0]["min_confidence"] == pytest.approx(0.3)


# --- K-means ---------------------------------------------------------------------------------


def test_kmeans_takes_the_image_nearest_each_cluster_centre() -> None:
    rng = np.random.default_rng(1)
    centres = np.array([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]])
    features = np.concatenate([c + rng.normal(0, 0.01, size=(10, 3)) for c in centres])
    chosen = nearest_to_centroids(features, 3, seed=0)
    assert sorted(int(i) // 10 for i in chosen) == [0, 1, 2]  # one from each blob
    for i in chosen:
        blob = features[int(i) // 10 * 10 : int(i) // 10 * 10 + 10]
        nearest = np.linalg.norm(blob - blob.mean(axis=0), axis=1).argmin()
        assert int(i) % 10 == nearest


@pytest.mark.parametrize("method", ["kmeans", "pca-kmeans"])
def test_kmeans_on_identical_probabilities_still_returns_k_distinct_images(method: str) -> None:
    probabilities = np.tile([1.0, 0.0, 0.0], (20, 1))  # e.g. a confident, rounding target
    probabilities[:5] = [0.0, 1.0, 0.0]  # two distinct points only
    images, labels = np.zeros((20, 2, 2), dtype=np.uint8), np.zeros(20, dtype=np.int64)
    result = make_selector(method)(images, labels, k=6, guide=probabilities)
    assert len(set(result.indices.tolist())) == 6
    assert {0, 1, 2, 3, 4} & set(result.indices.tolist())  # both distinct points are represented


# --- TRACE -----------------------------------------------------------------------------------


def test_hamming_matrix_counts_differing_bits() -> None:
    patterns = np.random.default_rng(2).random((9, 33)) < 0.5
    expected = [[int(np.sum(a != b)) for b in patterns] for a in patterns]
    assert hamming_matrix(patterns).tolist() == expected


def test_trace_min_gathers_similar_traces_and_trace_max_spreads_them() -> None:
    rng = np.random.default_rng(3)
    base = rng.random(64) < 0.5
    near = np.array([base ^ (rng.random(64) < 0.03) for _ in range(5)])  # 5 near-copies
    spread = rng.random((15, 64)) < 0.5
    activations = np.concatenate([near, spread])
    images, labels = np.zeros((20, 2, 2), dtype=np.uint8), np.zeros(20, dtype=np.int64)
    low = make_selector("trace-min")(images, labels, k=4, guide=activations)
    high = make_selector("trace-max")(images, labels, k=4, guide=activations)
    assert set(low.indices.tolist()) <= set(range(5))
    assert len(set(high.indices.tolist()) & set(range(5))) <= 1
    assert low.per_class[0]["hamming_sum"] < high.per_class[0]["hamming_sum"]
    distances = hamming_matrix(activations)
    sums = [distances[np.ix_(s, s)].sum() / 2 for s in itertools.combinations(range(20), 4)]
    assert high.per_class[0]["hamming_sum"] >= np.quantile(sums, 0.99)


# --- guides ----------------------------------------------------------------------------------


def test_guides_from_a_model() -> None:
    torch.manual_seed(0)
    model = build_model("lenet5")
    images = np.random.default_rng(4).integers(0, 256, size=(7, 1, 28, 28), dtype=np.uint8)
    probabilities = probabilities_from_model(model, images)
    assert probabilities.shape == (7, 10) and probabilities.dtype == np.float64
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    activations = activations_from_model(model, images)
    # every ReLU output of LeNet-5: 6x28x28 + 16x10x10 + 120 + 84 units
    assert activations.shape == (7, 6 * 28 * 28 + 16 * 10 * 10 + 120 + 84)
    assert activations.dtype == np.bool_ and 0 < activations.mean() < 1
    first_relu = torch.relu(model[0](torch.as_tensor(images[:1]).float() / 255))
    np.testing.assert_array_equal(activations[0, : 6 * 28 * 28], (first_relu > 0).flatten())


def test_guide_from_checkpoint_says_where_it_came_from(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "sub.pt", build_model("dnn5"), arch="dnn5", dataset="d")
    images = np.zeros((3, 1, 28, 28), dtype=np.uint8)
    guide, source = guide_from_checkpoint(path, "activations", images)
    assert guide.shape == (3, 512 + 256 + 128 + 64)
    assert source["kind"] == "activations" and source["arch"] == "dnn5"
    assert source["checkpoint"] == str(path) and len(source["sha256"]) == 64
    with pytest.raises(ValueError, match=r"cannot take the pool's images of shape \[3, 32, 32\]"):
        guide_from_checkpoint(path, "probabilities", np.zeros((2, 3, 32, 32), dtype=np.uint8))


# --- attacker select -------------------------------------------------------------------------


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["select", *args])
    return result.exit_code, " ".join(result.output.split())


def test_select_hcp_with_a_guide_model_records_the_guide(tmp_path: Path) -> None:
    torch.manual_seed(0)
    checkpoint = save_checkpoint(
        tmp_path / "sub.pt", build_model("lenet5"), arch="lenet5", dataset="mnist-embedded:pool"
    )
    out = tmp_path / "hcp.json"
    code, output = invoke("--method", "hcp", "--k", "50", "--guide-model", str(checkpoint),
                          "-o", str(out))  # fmt: skip
    assert code == 0, output
    assert f"guided by {checkpoint}" in output
    selection = Selection.load(out)
    assert selection.method == "hcp" and selection.k == 50 and selection.params == {}
    assert selection.guide is not None
    assert selection.guide["kind"] == "probabilities" and selection.guide["source"] == "model"
    assert selection.guide["checkpoint"] == str(checkpoint)
    saved = json.loads(out.read_text())
    assert saved["guide"]["arch"] == "lenet5"


def test_select_trace_and_cmal_take_their_options(tmp_path: Path) -> None:
    checkpoint = save_checkpoint(
        tmp_path / "sub.pt", build_model("lenet5"), arch="lenet5", dataset="mnist-embedded:pool"
    )
    out = tmp_path / "trace.json"
    code, output = invoke("--method", "trace-max", "--k", "20", "--init", "min-max", "--starts",
                          "3", "--guide-model", str(checkpoint), "-o", str(out))  # fmt: skip
    assert code == 0, output
    selection = Selection.load(out)
    assert selection.params == {"init": "min-max", "starts": 3, "seed": 0}
    assert selection.guide is not None and selection.guide["kind"] == "activations"
    code, output = invoke("--method", "cmal", "--k", "20", "-o", str(tmp_path / "cmal.json"))
    assert code == 0, output
    assert Selection.load(tmp_path / "cmal.json").guide is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "hcp"], "--method hcp needs the probabilities .* --guide-model"),
        (["--method", "trace-min"], "--method trace-min needs the activations"),
        (["--method", "cmal", "--guide-model", "x.pt"], "--guide-model is for the guided methods"),
        (["--method", "cmal", "--k", "1501"], "k must be in 1..1500, got 1501"),
        (["--method", "kmeans", "--guide-model", "missing.pt"], "checkpoint not found"),
        (["--method", "knn"], "unknown selection method 'knn'"),
    ],
)
def test_select_errors_name_the_value(args: list[str], message: str, tmp_path: Path) -> None:
    code, output = invoke(*args, "-o", str(tmp_path / "s.json"))
    assert code == 2
    assert re.search(message, output), output
    assert not (tmp_path / "s.json").exists()
