"""Query selection: DRMI (paper Algorithms 1-3) against brute force and a loop reference,
budget splitting, the selector contract and selection files."""

from __future__ import annotations

import itertools
import logging
from typing import Any, NamedTuple

import numpy as np
import pytest
from sklearn.datasets import load_digits

from attacker.selection import (
    SELECTORS,
    DrmiSelector,
    InvalidSelectionFile,
    RandomSelector,
    Selection,
    SelectionResult,
    Selector,
    SubsetResult,
    drmi_subset,
    make_selector,
    split_budget,
    subset_weight,
)
from attacker.selection.drmi import (
    _SWAP_RTOL,
    InitMethod,
    _as_weight_matrix,
    _greedy_init,
    _one_hot_replacement,
)
from mlcore.mutual_information import mutual_information_matrix

INITS: list[InitMethod] = ["min-sum", "min-max"]


def random_graph(rng: np.random.Generator, n: int, kind: str = "uniform") -> np.ndarray:
    """Symmetric non-negative weights with a zero diagonal."""
    a = rng.random((n, n))
    if kind == "squared":  # like MI^2: a few heavy edges
        a = a**2
    elif kind == "sparse":  # many zero-weight edges, so ties at H = 0 happen
        a = np.where(a > 0.6, a, 0.0)
    w = np.triu(a, 1)
    return w + w.T


def brute_force_min(w: np.ndarray, k: int) -> float:
    return min(subset_weight(w, np.array(s)) for s in itertools.combinations(range(len(w)), k))


def reference_single_start(
    w: np.ndarray, t: int, k: int, init: InitMethod
) -> tuple[list[int], list[int], float, int]:
    """Algorithms 2 + 3 from one start vertex, as plain loops over the paper's own arrays.

    Returns (S0 in insertion order, final S sorted, H, swaps). Ties go to the lowest vertex
    index, and a swap must beat In[p] by the same relative tolerance as the vectorised code.
    """
    n = len(w)
    # Algorithm 2
    s0 = [t]
    f = [w[t][i] for i in range(n)]
    for _ in range(1, k):
        p_new = min((i for i in range(n) if i not in s0), key=lambda i: (f[i], i))
        s0.append(p_new)
        for x in range(n):
            if x not in s0:
                f[x] = f[x] + w[p_new][x] if init == "min-sum" else max(f[x], w[p_new][x])
    # Algorithm 3
    s = set(s0)
    inn = {u: sum(w[u][j] for j in s if j != u) for u in s}
    out = {u: sum(w[u][j] for j in s) for u in range(n) if u not in s}
    h = 0.5 * sum(inn.values())
    swaps = 0
    while True:
        p = max(sorted(s), key=lambda u: inn[u])  # first maximum = lowest index
        q = min(sorted(out), key=lambda j: out[j] - w[p][j])
        if not (inn[p] > 0 and inn[p] - (out[q] - w[p][q]) > _SWAP_RTOL * inn[p]):
            break
        h += out[q] - w[p][q] - inn[p]
        s = (s | {q}) - {p}
        inn[q] = out.pop(q) - w[p][q]
        out[p] = inn.pop(p) + w[p][q]
        for u in s:
            if u != q:
                inn[u] = inn[u] - w[u][p] + w[u][q]
        for u in out:
            if u != p:
                out[u] = out[u] - w[u][p] + w[u][q]
        swaps += 1
    return s0, sorted(s), h, swaps


# --- DRMI core -------------------------------------------------------------------------------


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("kind", ["uniform", "squared", "sparse"])
def test_drmi_matches_brute_force_on_small_graphs(init: InitMethod, kind: str) -> None:
    rng = np.random.default_rng(7)
    hits, cases = 0, 50
    for _ in range(cases):
        n = int(rng.integers(5, 13))
        k = int(rng.integers(2, n))
        w = random_graph(rng, n, kind)
        result = drmi_subset(w, k, init=init)
        assert len(result.indices) == k == len(set(result.indices.tolist()))
        assert np.all(np.diff(result.indices) > 0), "indices must be sorted ascending"
        h = result.H
        assert h == pytest.approx(subset_weight(w, result.indices), abs=1e-9)
        optimum = brute_force_min(w, k)
        assert h >= optimum - 1e-9
        hits += h <= optimum + 1e-9
    assert hits / cases >= 0.8, f"DRMI found the optimum in only {hits}/{cases} graphs"


@pytest.mark.parametrize(
    ("n", "k", "kind"), [(40, 5, "uniform"), (60, 12, "squared"), (80, 20, "sparse")]
)
@pytest.mark.parametrize("init", INITS)
def test_drmi_beats_best_of_1000_random_subsets(
    n: int, k: int, kind: str, init: InitMethod
) -> None:
    rng = np.random.default_rng(n + k)
    w = random_graph(rng, n, kind)
    result = drmi_subset(w, k, init=init)
    subsets = np.array([rng.choice(n, size=k, replace=False) for _ in range(1000)])
    best_random = min(subset_weight(w, s) for s in subsets)
    h = result.H
    assert h <= best_random + 1e-12, (h, best_random)
    assert h == pytest.approx(subset_weight(w, result.indices), abs=1e-9)


@pytest.mark.parametrize("init", INITS)
def test_one_hot_replacement_never_raises_h(init: InitMethod) -> None:
    rng = np.random.default_rng(3)
    for n, k in [(10, 3), (30, 8), (50, 25), (40, 39)]:
        w = _as_weight_matrix(random_graph(rng, n, "squared"))
        random_sets = np.array([rng.choice(n, size=k, replace=False) for _ in range(20)])
        greedy_sets, _ = _greedy_init(w, np.arange(n), k, init=init)
        for initial in (random_sets, greedy_sets):
            final, h, swaps = _one_hot_replacement(w, initial)
            h_initial = np.array([subset_weight(w, s) for s in initial])
            assert np.all(h <= h_initial + 1e-12)
            assert np.all((swaps == 0) | (h < h_initial))  # every swap strictly lowers H
            assert np.all(np.diff(final, axis=1) > 0)
            np.testing.assert_allclose(h, [subset_weight(w, s) for s in final], atol=1e-9)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize(("n", "k"), [(12, 4), (25, 7), (40, 15), (30, 29)])
def test_vectorised_phases_equal_loop_reference(init: InitMethod, n: int, k: int) -> None:
    rng = np.random.default_rng(n * k)
    raw = random_graph(rng, n, "squared")
    w = _as_weight_matrix(raw)
    starts = np.arange(n)
    initial, sums = _greedy_init(w, starts, k, init=init)
    final, h, swaps = _one_hot_replacement(w, initial, sums)
    final_fresh, h_fresh, _ = _one_hot_replacement(w, initial)  # sums rebuilt from scratch
    np.testing.assert_array_equal(final, final_fresh)
    np.testing.assert_allclose(h, h_fresh, atol=1e-12)
    reference = [reference_single_start(raw, int(t), k, init) for t in starts]
    for t, (s0, s_ref, h_ref, swaps_ref) in enumerate(reference):
        assert initial[t].tolist() == s0, f"start {t}: greedy order differs"
        assert final[t].tolist() == s_ref, f"start {t}: final set differs"
        assert h[t] == pytest.approx(h_ref, abs=1e-9)
        assert swaps[t] == swaps_ref
    # Algorithm 1 = the best start of the reference, ties to the smallest start
    best_t = min(range(n), key=lambda t: (reference[t][2], t))
    result = drmi_subset(raw, k, init=init)
    h_best = result.H
    assert result.indices.tolist() == reference[best_t][1]
    assert h_best == pytest.approx(reference[best_t][2], abs=1e-9)


def test_chunked_batches_give_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    import attacker.selection.drmi as drmi

    w = random_graph(np.random.default_rng(11), 90, "squared")
    whole = drmi_subset(w, 10)
    monkeypatch.setattr(drmi, "_CHUNK_BYTES", 8 * 90 * 7)  # 7 starts per chunk
    assert same_result(drmi_subset(w, 10), whole)


def same_result(a: SubsetResult, b: SubsetResult) -> bool:
    return np.array_equal(a.indices, b.indices) and (a.H, a.start, a.swaps) == (
        b.H,
        b.start,
        b.swaps,
    )


@pytest.mark.parametrize("init", INITS)
def test_fewer_starts_is_valid_repeatable_and_never_beats_exact(init: InitMethod) -> None:
    w = random_graph(np.random.default_rng(5), 70, "squared")
    exact = drmi_subset(w, 9, init=init)
    approx = drmi_subset(w, 9, init=init, starts=10, seed=1)
    again = drmi_subset(w, 9, init=init, starts=10, seed=1)
    assert same_result(approx, again)
    h_exact, h_approx = exact.H, approx.H
    assert h_exact <= h_approx + 1e-12
    assert h_approx == pytest.approx(subset_weight(w, approx.indices), abs=1e-9)


def test_edge_sizes_k1_and_k_equals_n() -> None:
    w = random_graph(np.random.default_rng(0), 6)
    one = drmi_subset(w, 1)
    assert one.H == 0.0 and len(one.indices) == 1 and one.start == 0
    everything = drmi_subset(w, 6)
    assert everything.indices.tolist() == list(range(6))
    h_all = everything.H
    assert h_all == pytest.approx(np.triu(w, 1).sum())
    assert drmi_subset(np.zeros((1, 1)), 1).indices.tolist() == [0]


def test_diagonal_is_ignored() -> None:
    w = random_graph(np.random.default_rng(1), 20)
    noisy = w + np.diag(np.full(20, 1e6))
    assert same_result(drmi_subset(noisy, 5), drmi_subset(w, 5))


def test_swap_cap_stops_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    w = _as_weight_matrix(random_graph(np.random.default_rng(2), 30))
    initial = np.array([np.arange(8)])
    _, h_free, swaps_free = _one_hot_replacement(w, initial)
    assert swaps_free[0] > 1, "the graph must need more than one swap for this test"
    with caplog.at_level(logging.WARNING, logger="attacker.selection.drmi"):
        _, h, swaps = _one_hot_replacement(w, initial, max_swaps=1)
    assert swaps.tolist() == [1] and "cap of 1 swaps" in caplog.text
    assert h_free[0] <= h[0] < subset_weight(w, initial[0])


def test_min_max_and_min_sum_initialisations_differ() -> None:
    # From start 0 both add vertex 1 first (weight 0). Then min-sum prefers 2 (0.1 + 0.9 = 1.0
    # < 0.6 + 0.6) while min-max prefers 3 (max 0.6 < 0.9).
    w = np.array(
        [
            [0.0, 0.0, 0.1, 0.6],
            [0.0, 0.0, 0.9, 0.6],
            [0.1, 0.9, 0.0, 0.5],
            [0.6, 0.6, 0.5, 0.0],
        ]
    )
    prepared = _as_weight_matrix(w)
    by_sum, _ = _greedy_init(prepared, np.array([0]), 3, init="min-sum")
    by_max, _ = _greedy_init(prepared, np.array([0]), 3, init="min-max")
    assert by_sum.tolist() == [[0, 1, 2]]
    assert by_max.tolist() == [[0, 1, 3]]
    for init in INITS:
        result = drmi_subset(w, 3, init=init)
        assert len(set(result.indices.tolist())) == 3
        h = result.H
        assert h == pytest.approx(subset_weight(w, result.indices))
        assert h == pytest.approx(brute_force_min(w, 3))


# --- the paper's Figure 2 case, with real MI ----------------------------------------------


def near_identical_pairs(seed: int = 0) -> np.ndarray:
    """Three distinct random 28x28 images, each followed by a copy with a few pixels changed."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(3):
        image = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
        copy = image.copy()
        rows, cols = rng.integers(0, 28, size=(2, 6))
        copy[rows, cols] = rng.integers(0, 256, size=6, dtype=np.uint8)
        images += [image, copy]
    return np.stack(images)


@pytest.mark.parametrize("init", INITS)
def test_figure_2_picks_one_of_each_near_identical_pair(init: InitMethod) -> None:
    images = near_identical_pairs()
    result = DrmiSelector(init=init)(images, np.zeros(6, dtype=np.int64), k=3)
    pairs = sorted(int(i) // 2 for i in result.indices)
    assert pairs == [0, 1, 2], f"picked {result.indices.tolist()}"
    assert result.per_class[0]["k"] == 3 and result.per_class[0]["n"] == 6


def test_drmi_h_is_below_random_on_real_digits() -> None:
    digits = load_digits()
    images = (digits.images[digits.target == 4][:120] * 15).astype(np.uint8)  # 0..16 -> 0..240
    weights = mutual_information_matrix(images) ** 2
    drmi = drmi_subset(weights, 10)
    rng = np.random.default_rng(0)
    random_h = [
        subset_weight(weights, rng.choice(len(images), 10, replace=False)) for _ in range(200)
    ]
    h_drmi = drmi.H
    assert h_drmi < min(random_h), (h_drmi, min(random_h))


# --- budgets -------------------------------------------------------------------------------


class BudgetCase(NamedTuple):
    counts: dict[int, int]
    k: int
    proportional: bool
    expected: dict[int, int]


BUDGET_CASES = [
    BudgetCase({0: 10, 1: 10, 2: 10}, 9, False, {0: 3, 1: 3, 2: 3}),
    BudgetCase({2: 10, 0: 10, 1: 10}, 11, False, {0: 4, 1: 4, 2: 3}),  # remainder: ascending
    BudgetCase({0: 1, 1: 10, 2: 10}, 9, False, {0: 1, 1: 4, 2: 4}),  # capped, surplus spread
    BudgetCase({0: 1, 1: 2, 2: 10}, 12, False, {0: 1, 1: 2, 2: 9}),
    BudgetCase({0: 0, 1: 5}, 3, False, {0: 0, 1: 3}),
    BudgetCase({0: 5, 1: 5, 2: 5}, 2, False, {0: 1, 1: 1, 2: 0}),
    BudgetCase({0: 3, 1: 4}, 7, False, {0: 3, 1: 4}),
    BudgetCase({0: 50, 1: 30, 2: 20}, 10, True, {0: 5, 1: 3, 2: 2}),
    BudgetCase({0: 50, 1: 30, 2: 20}, 7, True, {0: 4, 1: 2, 2: 1}),  # 3.5, 2.1, 1.4
    BudgetCase({0: 1, 1: 1, 2: 1}, 2, True, {0: 1, 1: 1, 2: 0}),  # equal remainders: ascending
    BudgetCase({0: 1, 1: 99}, 50, True, {0: 1, 1: 49}),  # 0.5 vs 49.5: tie to the lower label
    BudgetCase({0: 2, 1: 3}, 5, True, {0: 2, 1: 3}),
]


@pytest.mark.parametrize("case", BUDGET_CASES, ids=lambda c: f"{c.counts}-k{c.k}-p{c.proportional}")
def test_split_budget(case: BudgetCase) -> None:
    share = split_budget(case.counts, case.k, proportional=case.proportional)
    assert share == case.expected
    assert sum(share.values()) == case.k
    assert all(0 <= share[c] <= case.counts[c] for c in case.counts)


@pytest.mark.parametrize(
    ("counts", "k", "message"),
    [
        ({0: 3, 1: 4}, 8, "k must be in 1..7"),
        ({0: 3, 1: 4}, 0, "got 0"),
        ({0: 3}, -1, "got -1"),
        ({}, 1, "at least one image"),
        ({0: -2}, 1, "got -2"),
    ],
)
def test_split_budget_rejects(counts: dict[int, int], k: int, message: str) -> None:
    for proportional in (True, False):
        with pytest.raises(ValueError, match=message):
            split_budget(counts, k, proportional=proportional)


# --- selectors -----------------------------------------------------------------------------


def small_pool(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(40, 8, 8), dtype=np.uint8)
    labels = np.repeat([0, 1, 2], [20, 12, 8])
    return images, rng.permutation(labels)


def test_random_selector_is_proportional_and_repeatable() -> None:
    images, labels = small_pool()
    result = RandomSelector(seed=3)(images, labels, k=10)
    assert {c: info["k"] for c, info in result.per_class.items()} == {0: 5, 1: 3, 2: 2}
    assert {c: int((labels[result.indices] == c).sum()) for c in (0, 1, 2)} == {0: 5, 1: 3, 2: 2}
    again = RandomSelector(seed=3)(images, labels, k=10)
    other = RandomSelector(seed=4)(images, labels, k=10)
    np.testing.assert_array_equal(result.indices, again.indices)
    assert not np.array_equal(result.indices, other.indices)


def test_drmi_selector_splits_evenly_and_maps_back_to_pool_indices() -> None:
    images, labels = small_pool()
    messages: list[str] = []
    result = DrmiSelector(progress=messages.append)(images, labels, k=10)
    assert {c: info["k"] for c, info in result.per_class.items()} == {0: 4, 1: 3, 2: 3}
    assert {c: int((labels[result.indices] == c).sum()) for c in (0, 1, 2)} == {0: 4, 1: 3, 2: 3}
    assert all(labels[info["start"]] == c for c, info in result.per_class.items())
    assert set(result.per_class[0]) == {"k", "n", "H", "start", "swaps"}
    assert len(messages) == 6
    # The same pool through drmi_subset directly gives the same class-0 choice.
    members = np.flatnonzero(labels == 0)
    subset = drmi_subset(mutual_information_matrix(images[members]) ** 2, 4)
    assert set(members[subset.indices]) <= set(result.indices.tolist())
    assert result.per_class[0]["H"] == pytest.approx(subset.H)


def test_selector_result_is_checked() -> None:
    class Broken(Selector):
        def __init__(self, indices: list[int]) -> None:
            self.indices = indices

        @property
        def params(self) -> dict[str, Any]:
            return {}

        def run(
            self, images: np.ndarray, labels: np.ndarray, *, k: int, guide: np.ndarray | None
        ) -> SelectionResult:
            return SelectionResult(indices=np.array(self.indices), per_class={})

    images, labels = small_pool()
    assert Broken([5, 1, 3])(images, labels, k=3).indices.tolist() == [1, 3, 5]
    for bad, message in [([1, 2], "2 indices"), ([1, 1, 2], "repeated"), ([1, 2, 40], "outside")]:
        with pytest.raises(RuntimeError, match=message):
            Broken(bad)(images, labels, k=3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: drmi_subset(np.zeros((4, 4)), 5), "k must be in 1..4, got 5"),
        (lambda: drmi_subset(np.zeros((4, 4)), 0), "k must be in 1..4, got 0"),
        (lambda: drmi_subset(np.zeros((4, 4)), 2, init="max-min"), "'max-min'"),  # type: ignore[arg-type]
        (lambda: drmi_subset(np.zeros((4, 4)), 2, starts=9), r"starts must be in 1\.\.4 .*got 9"),
        (lambda: drmi_subset(np.zeros((4, 3)), 2), r"shape \(4, 3\)"),
        (lambda: drmi_subset(np.full((3, 3), np.nan), 2), "finite"),
        (lambda: drmi_subset(-np.ones((3, 3)), 2), "non-negative"),
        (lambda: drmi_subset(np.triu(np.ones((3, 3))), 2), "symmetric"),
        (lambda: DrmiSelector(alpha=0), "alpha must be .* got 0"),
        (lambda: DrmiSelector(alpha=-1.5), "got -1.5"),
        (lambda: DrmiSelector(init="median"), "'median'"),  # type: ignore[arg-type]
        (lambda: DrmiSelector(bins=1), "bins must be in 2..256, got 1"),
        (lambda: RandomSelector(seed="x"), "seed must be an integer"),  # type: ignore[arg-type]
        (lambda: make_selector("jbda"), "'jbda'.*known: cmal, drmi, hcp"),
        (lambda: make_selector("random", sed=1), "bad parameters"),
        (lambda: RandomSelector(seed=0)(*small_pool(), k=41), "k must be in 1..40, got 41"),
        (lambda: RandomSelector(seed=0)(*small_pool(), k=0), "k must be in 1..40, got 0"),
        (
            lambda: RandomSelector(seed=0)(np.zeros((3, 2)), np.array([0.0, 1.0, 1.0]), k=1),
            "integer array",
        ),
        (lambda: RandomSelector(seed=0)(np.zeros((3, 2)), np.array([0, 1]), k=1), "3 and 2"),
    ],
)
def test_bad_parameters_raise_value_error_naming_the_value(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_make_selector_registry_round_trips_params() -> None:
    assert {"drmi", "random"} <= set(SELECTORS)
    drmi = make_selector("drmi", alpha=1.0, init="min-max", starts=50)
    assert isinstance(drmi, DrmiSelector)
    assert make_selector("drmi", **drmi.params).params == drmi.params
    assert make_selector("random", seed=9).params == {"seed": 9}


# --- selection files -----------------------------------------------------------------------


def test_selection_file_round_trip(tmp_path: Any) -> None:
    images, labels = small_pool()
    selector = RandomSelector(seed=1)
    result = selector(images, labels, k=6)
    result = SelectionResult(  # numpy scalars must survive JSON as plain numbers
        result.indices, {**result.per_class, 0: {**result.per_class[0], "H": np.float64(0.25)}}
    )
    selection = Selection.from_result(
        result, pool="mnist-embedded:pool", method="random", params=selector.params
    )
    path = selection.save(tmp_path / "nested" / "selection.json")
    loaded = Selection.load(path)
    assert loaded == selection
    assert loaded.indices == result.indices.tolist()
    assert loaded.per_class["0"]["H"] == 0.25
    assert set(loaded.per_class) == {"0", "1", "2"}
    rebuilt = make_selector(loaded.method, **loaded.params)(images, labels, k=loaded.k)
    assert rebuilt.indices.tolist() == loaded.indices


def test_selection_load_errors_name_the_file(tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        Selection.load(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(InvalidSelectionFile, match=r"broken\.json"):
        Selection.load(broken)
    inconsistent = tmp_path / "inconsistent.json"
    inconsistent.write_text(
        '{"pool": "p", "method": "random", "params": {}, "k": 3, "indices": [1, 2],'
        ' "per_class": {}}'
    )
    with pytest.raises(InvalidSelectionFile, match="k is 3 but there are 2 indices"):
        Selection.load(inconsistent)
