"""Calibration: thresholds set from per-client extremes keep the benign false-alarm share on
fresh clients, on both benign populations; the fixed PRADA default does not; parameters are
validated with clear errors; a calibration round-trips through JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from defenses.base import DetectorError, make_detector
from defenses.calibration import (
    POPULATIONS,
    Calibration,
    calibrate,
    check_parameters,
    threshold_for,
)
from defenses.mi_redundancy import calibrate_mi_reference
from defenses.prada import DEFAULT_DELTA
from mlcore.datasets import load_dataset
from mlcore.streams import NEAR_DUPLICATE_NOISE, NEAR_DUPLICATE_RATE, benign_stream

SHARE = 0.1
HORIZON = 250  # PRADA's first test comes at about 130 queries; MI's window here is 20


def nearest_mean_labels(train: torch.Tensor, labels: torch.Tensor):
    """A real (if simple) classifier for the detectors' labels: the nearest class mean."""
    flat = train.reshape(len(train), -1).float()
    means = torch.stack([flat[labels == c].mean(dim=0) for c in range(10)])
    return lambda x: torch.cdist(x.reshape(len(x), -1).float(), means).argmin(dim=1)


@pytest.fixture(scope="module")
def setup():
    train = load_dataset("mnist-embedded:target-train")
    reference = calibrate_mi_reference(train.images, window=20, n_windows=10, false_alarm_rate=0.1)
    detectors = {"prada": {}, "mi_redundancy": {"reference": reference}}
    return train, detectors, nearest_mean_labels(train.images, train.labels)


@pytest.fixture(scope="module")
def calibration(setup) -> Calibration:
    train, detectors, label_fn = setup
    return calibrate(
        detectors, train.images, label_fn, share=SHARE, horizon=HORIZON, clients=19, seed=0
    )


def flagged_share(extremes: list[float | None], threshold: float) -> float:
    return float(np.mean([e is not None and e < threshold for e in extremes]))


def test_calibrated_thresholds_keep_the_share_on_fresh_benign_clients(setup, calibration):
    _, detectors, label_fn = setup
    test = load_dataset("mnist-embedded:test")  # other images, other seeds: fresh clients
    fresh = calibrate(
        detectors, test.images, label_fn, share=SHARE, horizon=HORIZON, clients=40, seed=7
    )
    for name in detectors:
        threshold = calibration.threshold(name)
        for population in POPULATIONS:
            far = flagged_share(fresh.detectors[name]["extremes"][population.name], threshold)
            # expected <= 10%; 40 clients: 10 or more flagged at 10% has probability < 1%
            assert far < 0.25, (name, population.name, far)
        # The threshold is not vacuous: it is the stricter population's order statistic, so on
        # that population exactly k - 1 calibration clients (k = floor(0.1 * 20) = 2) fall below.
        per_population = {
            p.name: threshold_for(calibration.detectors[name]["extremes"][p.name], SHARE)
            for p in POPULATIONS
        }
        assert threshold == min(per_population.values())
        binding = min(per_population, key=per_population.__getitem__)
        extremes = calibration.detectors[name]["extremes"][binding]
        assert sum(e is not None and e < threshold for e in extremes) == 1
    # PRADA's binding population is the near-duplicate one (its tiny distances lower W), MI's
    # the one without repeats (repeats raise redundancy).
    prada = calibration.detectors["prada"]["extremes"]
    assert threshold_for(prada["near-duplicates"], SHARE) < threshold_for(
        prada["no repeats"], SHARE
    )
    mi = calibration.detectors["mi_redundancy"]["extremes"]
    assert threshold_for(mi["no repeats"], SHARE) < threshold_for(mi["near-duplicates"], SHARE)


def test_the_fixed_prada_default_flags_the_default_benign_client_and_the_calibrated_does_not(
    setup, calibration
):
    """Why item 11 exists: simulate-benign's default client (10% near-duplicates) makes a
    second mode of tiny distances, and W < 0.95 at PRADA's first test."""
    _, _, label_fn = setup
    test = load_dataset("mnist-embedded:test")
    stream = benign_stream(
        test.images, HORIZON, repeat_rate=NEAR_DUPLICATE_RATE, noise=NEAR_DUPLICATE_NOISE, seed=0
    )
    labels = label_fn(stream.images)
    fixed = make_detector("prada", delta=DEFAULT_DELTA)
    fixed.observe(stream.images, labels)
    assert fixed.first_alarm_at is not None and fixed.first_alarm_at <= 200
    calibrated = make_detector("prada", **calibration.settings()["prada"])
    calibrated.observe(stream.images, labels)
    assert calibrated.first_alarm_at is None


def test_lowest_statistic_is_the_minimum_over_every_test(setup):
    train, _, label_fn = setup
    stream = benign_stream(train.images, 400, repeat_rate=0.1, noise=0.02, seed=3)
    labels = label_fn(stream.images)
    detector = make_detector("prada")
    seen = [detector.observe(stream.images[i : i + 10], labels[i : i + 10]).statistic for i in range(0, 400, 10)]  # fmt: skip
    whole = make_detector("prada")
    whole.observe(stream.images, labels)  # one batch: tests inside it still count
    assert whole.lowest_statistic == detector.lowest_statistic == min(s for s in seen if s)


def test_threshold_is_the_kth_smallest_extreme():
    extremes = [0.9, 0.5, None, 0.7, 0.6, 0.8, 0.95, 0.99, 0.97]  # n = 9
    assert threshold_for(extremes, 0.2) == 0.6  # k = floor(0.2 * 10) = 2
    assert threshold_for(extremes, 0.1) == 0.5  # k = 1: nobody in the sample is flagged
    with pytest.raises(DetectorError, match="needs at least 19 simulated clients, got 9"):
        threshold_for(extremes, 0.05)
    with pytest.raises(DetectorError, match="no test within the horizon"):
        threshold_for([None, None, 0.5], 0.5)


@pytest.mark.parametrize(
    ("share", "horizon", "clients", "message"),
    [
        (0.0, 1000, 200, r"share must be a number in \(0, 1\), got 0.0"),
        (1.0, 1000, 200, r"share must be a number in \(0, 1\), got 1.0"),
        (True, 1000, 200, r"share must be a number in \(0, 1\), got True"),
        ("1%", 1000, 200, r"share must be a number in \(0, 1\), got '1%'"),
        (0.01, 0, 200, "horizon must be >= 1, got 0"),
        (0.01, 10.5, 200, "horizon must be an integer, got 10.5"),
        (0.01, 1000, 0, "clients must be >= 1, got 0"),
        (0.01, 1000, 50, "share=0.01 needs clients >= 99, got 50"),
    ],
)
def test_bad_parameters_are_named(share, horizon, clients, message: str):
    with pytest.raises(DetectorError, match=message):
        check_parameters(share, horizon, clients)
    with pytest.raises(DetectorError, match=message):
        calibrate({}, torch.zeros(5, 1, 2, 2), lambda x: x, share=share, horizon=horizon, clients=clients)  # fmt: skip


def test_a_horizon_too_short_for_any_test_is_refused(setup):
    train, _, label_fn = setup
    with pytest.raises(DetectorError, match="no test within the horizon"):
        calibrate({"prada": {}}, train.images, label_fn, share=0.5, horizon=50, clients=3)


def test_calibration_round_trips_through_json(calibration, tmp_path: Path):
    path = calibration.save(tmp_path / "m.calibration.json")
    loaded = Calibration.load(path)
    assert loaded == calibration
    data = json.loads(path.read_text())
    assert data["thresholds"] == {n: calibration.threshold(n) for n in calibration.detectors}
    assert data["detectors"]["prada"]["setting"] == "delta"
    assert data["detectors"]["mi_redundancy"]["setting"] == "threshold"
    # another share from the same extremes: larger share, higher (less strict) thresholds
    assert loaded.threshold("prada", 0.2) >= loaded.threshold("prada")
    data["share"] = 2
    with pytest.raises(DetectorError, match=r"share must be a number in \(0, 1\), got 2"):
        Calibration.from_dict(data)
    with pytest.raises(DetectorError, match="version 1, got None"):
        Calibration.from_dict({})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DetectorError, match="not a valid calibration"):
        Calibration.load(tmp_path / "bad.json")


def test_calibrated_thresholds_build_detectors(calibration, setup):
    _, detectors, _ = setup
    for name, settings in calibration.settings().items():
        detector = make_detector(name, **detectors[name], **settings)
        assert detector.verdict.threshold == calibration.threshold(name)
        assert math.isfinite(detector.verdict.threshold)
    with pytest.raises(DetectorError, match=r"threshold must be a finite number, got nan"):
        make_detector("mi_redundancy", **detectors["mi_redundancy"], threshold=float("nan"))


def test_simulate_benign_defaults_are_the_calibrated_near_duplicate_population():
    """The attacker cannot import mlcore.streams at CLI start-up cheaply, so its option
    defaults are literals: they must stay the population calibration protects."""
    import inspect

    from attacker.cli import simulate_benign

    parameters = inspect.signature(simulate_benign).parameters
    near = next(p for p in POPULATIONS if p.name == "near-duplicates")
    assert parameters["repeat_rate"].default == near.repeat_rate == NEAR_DUPLICATE_RATE
    assert parameters["noise"].default == near.noise == NEAR_DUPLICATE_NOISE
    assert parameters["queries"].default == 1000
