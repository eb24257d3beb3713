"""PRADA (Juuti et al. 2019) as the authors coded it: natural streams pass, JbDA-like synthetic
streams are flagged, the growing-set and threshold rules on a hand-computed stream, the
every-10th-query test, exact min distances, batches (with mixed predictions) equal
query-by-query observation, state round-trips, and errors that name the bad value."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest
import torch
from scipy.stats import shapiro

from defenses import prada
from defenses.base import DetectorError, StealingDetector, Verdict, make_detector
from defenses.prada import DEFAULT_DELTA, DEFAULT_MAX_STORED, PradaDetector
from mlcore.datasets import load_dataset

Stream = tuple[torch.Tensor, torch.Tensor]  # images (n, 1, 28, 28), predicted labels (n,)


def natural_stream(seed: int, n: int = 400) -> Stream:
    """Shuffled real MNIST test images, labelled with their true class."""
    test = load_dataset("mnist-embedded:test")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(test))[:n])
    return test.images[order], test.labels[order]


def jbda_stream(seed: int, *, steps: int = 20, lam: float = 0.1, per_class: int = 1) -> Stream:
    """JbDA-like synthesis: ``per_class`` seed images of each class, each moved ``steps`` times
    by lam * sign(noise) (clipped to [0, 1]) and queried after every step under its seed's
    label (a substitute's gradient sign looks like noise from the detector's side)."""
    test = load_dataset("mnist-embedded:test")
    labels = test.labels.numpy()
    first = [int(i) for c in range(10) for i in np.flatnonzero(labels == c)[:per_class]]
    current = test.as_float()[first]
    generator = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(steps):
        sign = torch.randint(0, 2, current.shape, generator=generator).float() * 2 - 1
        current = (current + lam * sign).clamp(0, 1)
        images.append(current)
    return torch.cat(images), test.labels[first].repeat(steps)


def repeats_stream(seed: int, n: int = 600, classes: int = 3) -> Stream:
    """Real images drawn with replacement (exact duplicates happen) under ``classes`` labels,
    so each class's growing set passes the size at which the batched search kicks in."""
    test = load_dataset("mnist-embedded:test")
    index = torch.from_numpy(np.random.default_rng(seed).integers(0, 300, n))
    return test.images[index], test.labels[index] % classes


def observe_in_batches(detector: StealingDetector, stream: Stream, size: int) -> list[Verdict]:
    x, y = stream
    return [detector.observe(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


# -- detection -----------------------------------------------------------------------------


class StreamCase(NamedTuple):
    stream: Callable[[int], Stream]
    flagged: bool


STREAMS = {
    "natural-mnist": StreamCase(natural_stream, flagged=False),
    "jbda-1-seed-per-class": StreamCase(jbda_stream, flagged=True),
    "jbda-5-seeds-per-class": StreamCase(
        lambda seed: jbda_stream(seed, steps=6, per_class=5), flagged=True
    ),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", STREAMS.values(), ids=STREAMS.keys())
def test_natural_streams_pass_and_synthetic_steps_are_flagged(case: StreamCase, seed: int):
    detector = PradaDetector()  # default delta
    verdicts = observe_in_batches(detector, case.stream(seed), 10)
    final = verdicts[-1]
    assert final.threshold == DEFAULT_DELTA
    assert final.statistic is not None  # enough distances were pooled to test
    assert final.flagged is case.flagged
    assert (final.statistic < DEFAULT_DELTA) is case.flagged
    if case.flagged:
        # flagged at the first test with more than 100 pooled distances, and it stays flagged
        assert detector.first_alarm_at is not None and detector.first_alarm_at <= 160
        assert all(v.flagged for v in verdicts[detector.first_alarm_at // 10 - 1 :])
    else:
        assert detector.first_alarm_at is None
        assert all(not v.flagged for v in verdicts)


# -- the growing-set rules, by hand ------------------------------------------------------------


def pixels(*values: int) -> torch.Tensor:
    """One-pixel uint8 images (n, 1, 1, 1): their L2 distance is |a - b| / 255."""
    return torch.tensor(values, dtype=torch.uint8).reshape(-1, 1, 1, 1)


def test_growing_set_distances_and_threshold_on_a_hand_computed_stream():
    detector = PradaDetector()
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 0])
    detector.observe(pixels(0, 128, 128, 192, 200, 64, 32), labels)

    # (values and distances in units of 1/255)
    # 0:   class 0 is new: G = [0], T = 0, D_G = [0], D = []
    # 128: d = 128 > T = 0: joins G; D_G = [0, 128]; T = max(0, 64 - 64) = 0
    # 128: d = 0 (a repeat), not > T: stays out of G
    # 192: d = 64 > 0: joins; D_G = [0, 128, 64]: T = 64 - std = 64 - 52.26 = 11.74
    # 200: d = 8 < T: stays out
    # 64:  class 1 is new, nothing is added to D
    # 32:  d = 32 > T: joins; D_G = [0, 128, 64, 32]: mean - std = 8.67 < T, T stays
    growing = [0.0, 128 / 255, 64 / 255, 32 / 255]
    threshold = (64 - math.sqrt((64**2 + 64**2 + 0.0) / 3)) / 255  # population std (ddof=0)
    assert detector.class_state(0) == {
        "dists": pytest.approx([128 / 255, 0.0, 64 / 255, 8 / 255, 32 / 255], abs=1e-15),
        "growing_dists": pytest.approx(growing, abs=1e-15),
        "threshold": pytest.approx(threshold, abs=1e-15),
        "size": 4,
    }
    assert np.mean(growing) - np.std(growing) < threshold  # the max() rule kept T
    assert detector.class_state(1) == {
        "dists": [],
        "growing_dists": [0.0],
        "threshold": 0.0,
        "size": 1,
    }
    # the sample std (ddof=1) of [0, 128, 64] is 64 and would have left T at 0
    assert 64 - np.std([0.0, 128, 64], ddof=1) == 0.0
    assert detector.queries_seen == 7
    assert detector.verdict == Verdict(flagged=False, statistic=None, threshold=DEFAULT_DELTA)


def test_float_inputs_are_quantised_to_the_uint8_grid():
    """0.5 is stored as round(127.5) = 128: the distance to an all-0 image is 128 / 255, and a
    float image equal to k / 255 gives exactly the state of its uint8 twin."""
    detector = PradaDetector()
    detector.observe(torch.tensor([0.0, 0.5, 0.502]).reshape(-1, 1, 1, 1), torch.zeros(3).long())
    assert detector.class_state(0)["dists"] == [128 / 255, 0.0]
    x, y = repeats_stream(seed=4, n=200)
    as_uint8, as_float = PradaDetector(), PradaDetector()
    observe_in_batches(as_uint8, (x, y), 20)
    observe_in_batches(as_float, (x.float() / 255, y), 20)
    for c in range(3):
        assert as_float.class_state(c) == as_uint8.class_state(c)


class ReferencePrada:
    """The authors' rules written plainly (a Python loop over float64 images k / 255 per
    stored query), with the ``max_stored`` cap: a query joins G_c only while fewer than
    ``max_stored`` queries are stored; a new class's first query always starts its G_c."""

    def __init__(self, max_stored: int) -> None:
        self.max_stored = max_stored
        self.stored: dict[int, list[np.ndarray]] = {}
        self.growing: dict[int, list[float]] = {}
        self.threshold: dict[int, float] = {}
        self.dists: dict[int, list[float]] = {}  # in order of each class's first distance
        self.seen = 0
        self.verdict: tuple[bool, float | None] = (False, None)

    def observe(self, image: np.ndarray, c: int) -> tuple[bool, float | None]:
        v = image.reshape(-1).astype(np.float64) / 255
        if c not in self.stored:
            self.stored[c], self.growing[c], self.threshold[c] = [v], [0.0], 0.0
        else:
            d = min(math.sqrt(float(((g - v) ** 2).sum())) for g in self.stored[c])
            self.dists.setdefault(c, []).append(d)
            total = sum(len(rows) for rows in self.stored.values())
            if d > self.threshold[c] and total < self.max_stored:
                self.stored[c].append(v)
                self.growing[c].append(d)
                gd = self.growing[c]
                self.threshold[c] = max(self.threshold[c], float(np.mean(gd) - np.std(gd)))
        self.seen += 1
        if self.seen % 10 == 0:
            pooled = [d for ds in self.dists.values() if len(ds) >= 10 for d in ds]
            if pooled:
                data = np.asarray(pooled)
                kept = data[np.abs(data - data.mean()) < 3 * data.std()]
                if len(kept) > 100:
                    w = float(shapiro(kept).statistic)
                    self.verdict = (w < DEFAULT_DELTA, w)
        return self.verdict


def mixed_stream() -> Stream:
    """Natural images with exact repeats, float images off the uint8 grid and JbDA-like steps,
    five classes, so both the exact loop and the matrix-product search run."""
    x, y = repeats_stream(seed=3, n=300, classes=5)
    steps, step_labels = jbda_stream(seed=1, steps=10)
    floats = (
        x[:60].float() / 255
        + torch.rand(60, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 0.01
    )
    images = torch.cat([x.float() / 255, steps, floats.clamp(0, 1)])
    labels = torch.cat([y, step_labels % 5, y[:60]])
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(images)))
    return images[order], labels[order]


@pytest.mark.parametrize("max_stored", [DEFAULT_MAX_STORED, 150])
def test_matches_a_reference_implementation_of_the_authors_rules(max_stored: int):
    """Same distances (to 1e-12), thresholds, set sizes and verdicts after every batch, on a
    mixed stream fed in batches of 1, 3, 60 and 200 (exact loop and matrix product alike)."""
    x, y = mixed_stream()
    quantised = np.rint(x.numpy() * 255).astype(np.uint8)  # how PRADA reads a float image
    reference = ReferencePrada(max_stored)
    detector = PradaDetector(max_stored=max_stored)
    i, sizes = 0, [1, 3, 60, 200] * 10
    while i < len(x):
        size = sizes.pop(0)
        verdict = detector.observe(x[i : i + size], y[i : i + size])
        for image, c in zip(quantised[i : i + size], y[i : i + size].tolist(), strict=True):
            expected = reference.observe(image, c)
        assert verdict.flagged is expected[0]
        assert verdict.statistic == pytest.approx(expected[1], abs=1e-9)
        i += size
    assert reference.seen == detector.queries_seen == 460
    for c in range(5):
        state = detector.class_state(c)
        assert state["size"] == len(reference.stored[c])
        assert state["dists"] == pytest.approx(reference.dists[c], abs=1e-12)
        assert state["growing_dists"] == pytest.approx(reference.growing[c], abs=1e-12)
        assert state["threshold"] == pytest.approx(reference.threshold[c], abs=1e-12)
    assert 0.0 in detector.class_state(0)["dists"]  # exact repeats give exactly 0
    stored = sum(detector.growing_set_sizes.values())
    assert detector.details() == {"stored": stored, "max_stored": max_stored}
    assert stored == min(max_stored, 226)  # 226 queries join without a cap


def test_uint8_images_equal_their_float_version():
    x, y = natural_stream(0, n=150)
    as_uint8, as_float = PradaDetector(), PradaDetector()
    observe_in_batches(as_uint8, (x, y), 25)
    observe_in_batches(as_float, (x.float() / 255, y), 25)
    assert as_uint8.state_dict().keys() == as_float.state_dict().keys()
    assert as_uint8.verdict == as_float.verdict
    for c in range(10):
        assert as_uint8.class_state(c) == as_float.class_state(c)


def test_the_cap_bounds_stored_queries_and_detection_goes_on():
    """With max_stored=40 a JbDA-like stream is still flagged, the sets never hold more than 40
    queries (no spare capacity either), every query still gets its distance, and a class first
    seen after the cap still starts its set, so its queries are tested too."""
    x, y = jbda_stream(seed=0, steps=25)  # 250 queries; classes 0..9 each start a set early
    keep = y != 9  # class 9 comes last, after the cap
    x = torch.cat([x[keep], x[~keep]])
    y = torch.cat([y[keep], y[~keep]])
    detector = PradaDetector(max_stored=40)
    for i in range(0, len(x), 5):
        detector.observe(x[i : i + 5], y[i : i + 5])
        stored = detector.details()["stored"]
        assert stored == sum(detector.growing_set_sizes.values())
        assert stored <= 40 if i + 5 <= int(keep.sum()) else stored == 41
        capacity = sum(len(s.rows) for s in detector._classes.values())  # the memory held
        assert capacity == stored if stored >= 40 else capacity <= 2 * stored + 16 * 10
    assert detector.details() == {"stored": 41, "max_stored": 40}
    assert detector.first_alarm_at is not None and detector.verdict.flagged
    assert sum(len(detector.class_state(c)["dists"]) for c in range(10)) == 250 - 10
    assert detector.class_state(9)["size"] == 1
    assert len(detector.class_state(9)["dists"]) == 24


# -- when it tests -------------------------------------------------------------------------


def reference_w(detector: PradaDetector) -> float | None:
    """The authors' test from the per-class distances: pool classes with >= 10 distances, keep
    values within 3 (population) std of the mean, Shapiro-Wilk if more than 100 remain."""
    pooled = [d for c in detector.growing_set_sizes for d in _dists(detector, c, minimum=10)]
    data = np.asarray(pooled)
    kept = data[np.abs(data - data.mean()) < 3 * data.std()]
    return float(shapiro(kept).statistic) if len(kept) > 100 else None


def _dists(detector: PradaDetector, c: int, *, minimum: int) -> list[float]:
    dists = detector.class_state(c)["dists"]
    return dists if len(dists) >= minimum else []


def test_tests_run_after_every_10th_query_and_the_verdict_stands_between():
    x, y = jbda_stream(seed=0, steps=25)  # 250 queries, 10 classes
    detector = PradaDetector()
    statistics = [detector.observe(x[i : i + 1], y[i : i + 1]).statistic for i in range(len(x))]
    # 10 classes: 10 first queries add no distance; 101 distances exist after query 111, so the
    # first test with more than 100 values is the one after query 120
    assert statistics[:119] == [None] * 119
    assert statistics[119] is not None
    for i in range(120, len(x)):  # query i + 1
        if (i + 1) % 10:
            assert statistics[i] == statistics[i - 1]
    assert len({statistics[i] for i in range(119, len(x), 10)}) == 14  # each test is new
    assert detector.first_alarm_at == 120


def test_pooling_skips_classes_with_fewer_than_10_distances_and_drops_outliers():
    test = load_dataset("mnist-embedded:test")
    rng = np.random.default_rng(5)
    big = [int(i) for i in rng.choice(np.flatnonzero(test.labels.numpy() == 1), 80, False)]
    big += [int(i) for i in rng.choice(np.flatnonzero(test.labels.numpy() == 7), 40, False)]
    few = [int(i) for i in np.flatnonzero(test.labels.numpy() == 3)[:10]]  # 9 distances
    x = torch.cat([test.images[big], test.images[few]]).float() / 255
    y = torch.cat([torch.zeros(80), torch.full((40,), 2), torch.ones(10)]).long()
    x[79] = 1.0  # an all-white query: a far outlier among class 0's distances
    detector = PradaDetector()
    verdict = detector.observe(x, y)
    assert detector.queries_seen == 130
    assert len(detector.class_state(1)["dists"]) == 9
    assert verdict.statistic == pytest.approx(reference_w(detector), abs=1e-12)
    with_small_class = [d for c in (0, 2, 1) for d in detector.class_state(c)["dists"]]
    assert verdict.statistic != pytest.approx(shapiro(with_small_class).statistic, abs=1e-6)


# -- equivalences --------------------------------------------------------------------------


@functools.cache
def query_by_query() -> tuple[Stream, PradaDetector, list[Verdict]]:
    stream = repeats_stream(seed=1, n=400)
    detector = PradaDetector()
    return stream, detector, observe_in_batches(detector, stream, 1)


@pytest.mark.parametrize("size", [7, 37, 400])
def test_batches_with_mixed_predictions_equal_query_by_query(size: int):
    stream, one, singles = query_by_query()
    batched = PradaDetector()
    verdicts = observe_in_batches(batched, stream, size)
    assert len(set(stream[1][:size].tolist())) == 3  # the batches really mix classes
    assert verdicts == [singles[min(i + size, len(singles)) - 1] for i in range(0, 400, size)]
    assert batched.first_alarm_at == one.first_alarm_at is not None
    for c in range(3):
        assert batched.class_state(c) == one.class_state(c)


def test_large_batches_are_searched_in_groups_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch,
):
    """The (queries x rows) product is split into groups of queries to bound its memory; with
    groups of 1 to 3 queries, two 200-query batches still equal query-by-query observation."""
    groups: list[int] = []
    product = prada._min_sq_by_product

    def spy(state, q, q_norms):  # type: ignore[no-untyped-def]
        groups.append(len(q))
        return product(state, q, q_norms)

    monkeypatch.setattr(prada, "_min_sq_by_product", spy)
    monkeypatch.setattr(prada, "_PRODUCT_BYTES", 4 * 3 * 50)  # 3 queries against 50 rows
    stream, one, singles = query_by_query()
    grouped = PradaDetector()
    assert observe_in_batches(grouped, stream, 200) == [singles[199], singles[399]]
    assert len(groups) > 50 and max(groups) <= 3  # the second batch ran in small groups
    for c in range(3):
        assert grouped.class_state(c) == one.class_state(c)


@pytest.mark.parametrize("stream", [jbda_stream(4, steps=30), repeats_stream(2, 300)])
def test_state_round_trips_mid_stream(stream: Stream):
    x, y = stream
    original = PradaDetector()
    original.observe(x[:105], y[:105])  # between tests, before the first alarm
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = PradaDetector()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.queries_seen == 105 and restored.verdict == original.verdict
    for i in range(105, len(x), 5):
        assert restored.observe(x[i : i + 5], y[i : i + 5]) == original.observe(
            x[i : i + 5], y[i : i + 5]
        )
    assert restored.first_alarm_at == original.first_alarm_at is not None
    assert restored.growing_set_sizes == original.growing_set_sizes


def test_protocol_and_registry():
    detector = make_detector("prada", delta=0.9)
    assert isinstance(detector, PradaDetector) and isinstance(detector, StealingDetector)
    assert detector.name == "prada" and detector.verdict.threshold == 0.9
    assert detector.queries_seen == 0 and detector.first_alarm_at is None
    empty = detector.observe(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.int64))
    assert empty == Verdict(False, None, 0.9) and detector.queries_seen == 0


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [0, 1, 1.5, -0.1, float("nan"), "0.9", True, None])
def test_bad_delta_is_named(delta: object):
    with pytest.raises(DetectorError, match=rf"delta must be .*got {delta!r}"):
        make_detector("prada", delta=delta)
    assert issubclass(DetectorError, ValueError)


@pytest.mark.parametrize("max_stored", [0, -1, 1.5, "10", True, None])
def test_bad_max_stored_is_named(max_stored: object):
    with pytest.raises(DetectorError, match=rf"max_stored must be .*got {max_stored!r}"):
        make_detector("prada", max_stored=max_stored)


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("pradaa", {}, "detector must be one of .* got 'pradaa'"),
        ("prada", {"dleta": 0.9}, "dleta"),
    ],
)
def test_unknown_detector_or_setting_is_named(name: str, settings: dict, message: str):
    with pytest.raises(DetectorError, match=message):
        make_detector(name, **settings)


GOOD_X = torch.zeros(2, 1, 28, 28)
GOOD_Y = torch.tensor([0, 1])


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (torch.zeros(2, 28, 28), GOOD_Y, r"shape \(n, C, H, W\), got \(2, 28, 28\)"),
        (torch.full((2, 1, 28, 28), float("nan")), GOOD_Y, "finite"),
        (torch.full((2, 1, 28, 28), 2.0), GOOD_Y, r"\[0, 1\], got range \[2.0, 2.0\]"),
        (torch.zeros(2, 1, 28, 28, dtype=torch.int32), GOOD_Y, "got dtype torch.int32"),
        (GOOD_X, torch.tensor([0, 1, 2]), "same length, got 2 and 3"),
        (GOOD_X, torch.tensor([0.0, 1.0]), "1-D integer"),
        (GOOD_X, torch.tensor([0, -1]), "labels must be >= 0, got -1"),
    ],
    ids=["ndim", "nan", "range", "dtype", "length", "float-labels", "negative-label"],
)
def test_bad_batches_are_named(x: torch.Tensor, y: torch.Tensor, message: str):
    detector = PradaDetector()
    with pytest.raises(DetectorError, match=message):
        detector.observe(x, y)
    assert detector.queries_seen == 0


def test_images_too_large_for_exact_integer_distances_are_refused():
    detector = PradaDetector()
    with pytest.raises(DetectorError, match=r"at most 33025 values, got \(1, 182, 182\)"):
        detector.observe(torch.zeros(1, 1, 182, 182, dtype=torch.uint8), GOOD_Y[:1])
    assert detector.queries_seen == 0


def test_image_shape_is_pinned_and_states_are_checked():
    detector = PradaDetector()
    detector.observe(GOOD_X, GOOD_Y)
    with pytest.raises(DetectorError, match=r"image shape \(1, 28, 28\).*got \(1, 32, 32\)"):
        detector.observe(torch.zeros(1, 1, 32, 32), GOOD_Y[:1])
    state = detector.state_dict()
    with pytest.raises(DetectorError, match="for detector 'mi_redundancy', not 'prada'"):
        PradaDetector().load_state_dict({**state, "kind": "mi_redundancy"})
    with pytest.raises(DetectorError, match="match 'classes'"):
        PradaDetector().load_state_dict({**state, "thresholds": [0.0]})
