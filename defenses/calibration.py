"""Per-client detector thresholds: at most a chosen share of benign clients flagged per horizon.

A fixed threshold (PRADA's delta = 0.95, the MI reference's per-window quantile) says nothing
about what it costs honest customers: PRADA at 0.95 flags every benign client that re-sends a
few near-duplicates (their tiny distances make a second mode, W falls to about 0.90 at the
first test). Calibration states the cost instead: "at most ``share`` of benign clients is
flagged within ``horizon`` queries", and sets each detector's threshold to meet it.

How (one simulation per client, no search over thresholds). Every detector flags when its
statistic falls below its threshold (``DetectorBase``). For each simulated benign client, a
``benign_stream`` of ``horizon`` queries labelled by the model, a fresh detector observes the
whole stream once and we keep the lowest statistic it reached (its *extreme*; +inf, stored as
null, when it never tested). That client is flagged within the horizon exactly when its
extreme < threshold, so the threshold is an order statistic of the extremes: the k-th
smallest, k = floor(share * (clients + 1)). A fresh benign client of the same model is then
flagged with probability k / (clients + 1) <= share (the extremes are exchangeable); this
needs clients + 1 >= 1 / share.

Populations: the benign model without repeats (the DRMI paper's "random queries") and with
near-duplicates (``attacker simulate-benign``'s default client), each with its own clients.
The threshold must hold on both, so each detector takes the stricter (lower) of the two.

``calibrate(...)`` returns a ``Calibration``: the per-client extremes, hence the threshold at
any share (``threshold(detector, share)``), and ``settings()`` to pass to ``make_detector``.
It is JSON (``save`` / ``load``); the service keeps it beside the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from defenses.base import (
    DetectorBase,
    DetectorError,
    check_fraction,
    check_int,
    make_detector,
    read_json,
    write_json,
)
from mlcore.streams import NEAR_DUPLICATE_NOISE, NEAR_DUPLICATE_RATE, benign_stream

__all__ = [
    "DEFAULT_CLIENTS",
    "DEFAULT_HORIZON",
    "DEFAULT_SHARE",
    "POPULATIONS",
    "QUICK_CLIENTS",
    "BenignPopulation",
    "Calibration",
    "calibrate",
    "check_parameters",
    "threshold_for",
]

DEFAULT_SHARE = 0.01
DEFAULT_HORIZON = 1000
DEFAULT_CLIENTS = 200
# When a freshly trained checkpoint is calibrated (service first start, ``train``): enough for
# a 1% share (its threshold is the lowest of 100 extremes), quick enough for a first start.
QUICK_CLIENTS = 100
_VERSION = 1


@dataclass(frozen=True)
class BenignPopulation:
    """A benign-client model: ``benign_stream`` with these repeats and near-duplicate noise."""

    name: str
    repeat_rate: float
    noise: float


POPULATIONS = (
    BenignPopulation("no repeats", 0.0, 0.0),
    BenignPopulation("near-duplicates", NEAR_DUPLICATE_RATE, NEAR_DUPLICATE_NOISE),
)


def check_parameters(share: object, horizon: object, clients: object) -> tuple[float, int, int]:
    """Validated ``share`` in (0, 1), ``horizon`` >= 1 and ``clients`` >= 1, enough clients
    for the share (clients + 1 >= 1 / share)."""
    share = check_fraction("share", share)
    horizon = check_int("horizon", horizon, low=1)
    clients = check_int("clients", clients, low=1)
    if math.floor(share * (clients + 1)) < 1:
        raise DetectorError(
            f"share={share} needs clients >= {math.ceil(1 / share) - 1}, got {clients}"
        )
    return share, horizon, clients


def threshold_for(extremes: Sequence[float | None], share: float) -> float:
    """The k-th smallest extreme, k = floor(share * (n + 1)): a fresh client is flagged (its
    extreme below it) with probability k / (n + 1) <= share."""
    share = check_fraction("share", share)
    n = len(extremes)
    k = math.floor(share * (n + 1))
    if k < 1:
        raise DetectorError(
            f"share={share} needs at least {math.ceil(1 / share) - 1} simulated clients, got {n}"
        )
    value = sorted(math.inf if e is None else e for e in extremes)[k - 1]
    if not math.isfinite(value):
        raise DetectorError(
            f"the detector ran no test within the horizon for {n - k + 1} of {n} clients; "
            "choose a longer horizon"
        )
    return value


@dataclass(frozen=True)
class Calibration:
    """Per detector and population, each simulated client's extreme; and how they were made.

    ``detectors[name]`` holds ``setting`` (the threshold's setting name), ``settings`` (the
    other settings the detector ran with, JSON values only) and ``extremes`` (population name
    -> one value per client, None when it never tested).
    """

    share: float
    horizon: int
    clients: int
    seed: int
    populations: tuple[BenignPopulation, ...]
    detectors: dict[str, dict[str, Any]]
    source: dict[str, Any] = field(default_factory=dict)

    def threshold(self, detector: str, share: float | None = None) -> float:
        """The stricter of the populations' thresholds at ``share`` (default: the calibrated)."""
        if detector not in self.detectors:
            raise DetectorError(
                f"detector must be one of {sorted(self.detectors)} (calibrated), got {detector!r}"
            )
        share = self.share if share is None else share
        extremes = self.detectors[detector]["extremes"]
        return min(threshold_for(extremes[p.name], share) for p in self.populations)

    def settings(self, share: float | None = None) -> dict[str, dict[str, float]]:
        """``{detector: {threshold setting: threshold}}``, ready for ``make_detector``."""
        return {
            name: {entry["setting"]: self.threshold(name, share)}
            for name, entry in self.detectors.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "share": self.share,
            "horizon": self.horizon,
            "clients": self.clients,
            "seed": self.seed,
            "populations": [asdict(p) for p in self.populations],
            "thresholds": {name: self.threshold(name) for name in self.detectors},
            "detectors": self.detectors,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        if not isinstance(data, Mapping) or data.get("version") != _VERSION:
            version = data.get("version") if isinstance(data, Mapping) else None
            raise DetectorError(
                f"a calibration must be a dict of version {_VERSION}, got {version!r}"
            )
        try:
            calibration = cls(
                share=check_fraction("share", data["share"]),
                horizon=check_int("horizon", data["horizon"], low=1),
                clients=check_int("clients", data["clients"], low=1),
                seed=check_int("seed", data["seed"], low=0),
                populations=tuple(BenignPopulation(**p) for p in data["populations"]),
                detectors={
                    str(name): {
                        "setting": str(entry["setting"]),
                        "settings": dict(entry["settings"]),
                        "extremes": {
                            str(p): [None if e is None else float(e) for e in values]
                            for p, values in entry["extremes"].items()
                        },
                    }
                    for name, entry in data["detectors"].items()
                },
                source=dict(data.get("source", {})),
            )
            for name in calibration.detectors:
                calibration.threshold(name)  # every population present, enough clients
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, DetectorError):
                raise
            raise DetectorError(f"not a valid calibration: {exc!r}") from exc
        return calibration

    def save(self, path: str | os.PathLike[str]) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        return cls.from_dict(read_json(path, "calibration"))


def calibrate(
    detectors: Mapping[str, Mapping[str, Any]],
    images: Tensor,
    label_fn: Callable[[Tensor], Tensor],
    *,
    share: float = DEFAULT_SHARE,
    horizon: int = DEFAULT_HORIZON,
    clients: int = DEFAULT_CLIENTS,
    populations: Sequence[BenignPopulation] = POPULATIONS,
    seed: int = 0,
    progress: Callable[[str, int], None] | None = None,
) -> Calibration:
    """Simulate ``clients`` benign clients per population drawing from ``images``, run each
    detector of ``detectors`` (name -> settings; a threshold setting given there is ignored)
    once over each client's ``horizon`` queries, with the labels ``label_fn`` (the model)
    gives, and keep the extremes.

    ``label_fn`` labels ``images`` once; per client only the noisy near-duplicates need the
    model again (every other query is an exact copy of one of ``images``).
    ``progress(population, clients done)`` is called after each client.
    """
    share, horizon, clients = check_parameters(share, horizon, clients)
    seed = check_int("seed", seed, low=0)
    if not populations or len({p.name for p in populations}) != len(populations):
        raise DetectorError("populations must be a non-empty list with distinct names")
    runs: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, settings in detectors.items():
        setting = _detector_class(name, dict(settings)).threshold_setting
        runs[name] = (setting, {k: v for k, v in settings.items() if k != setting})

    extremes: dict[str, dict[str, list[float | None]]] = {name: {} for name in runs}
    image_labels = label_fn(images)
    with _one_numba_thread():
        for index, population in enumerate(populations):
            lowest: dict[str, list[float | None]] = {name: [] for name in runs}
            client_seeds = np.random.SeedSequence([seed, index]).generate_state(clients)
            for done, client_seed in enumerate(client_seeds, start=1):
                stream = benign_stream(
                    images,
                    horizon,
                    repeat_rate=population.repeat_rate,
                    noise=population.noise,
                    seed=int(client_seed),
                )
                labels = image_labels[stream.source]
                if population.noise > 0 and bool(stream.repeated.any()):
                    labels[stream.repeated] = label_fn(stream.images[stream.repeated])
                for name, (_, settings) in runs.items():
                    detector = make_detector(name, **settings)
                    detector.observe(stream.images, labels)
                    value = detector.lowest_statistic  # type: ignore[attr-defined]
                    lowest[name].append(value if math.isfinite(value) else None)
                if progress is not None:
                    progress(population.name, done)
            for name in runs:
                extremes[name][population.name] = lowest[name]

    calibration = Calibration(
        share=share,
        horizon=horizon,
        clients=clients,
        seed=seed,
        populations=tuple(populations),
        detectors={
            name: {
                "setting": setting,
                "settings": recordable_settings(settings),
                "extremes": extremes[name],
            }
            for name, (setting, settings) in runs.items()
        },
    )
    for name in runs:
        calibration.threshold(name)  # fail now if a detector never tested within the horizon
    return calibration


def recordable_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a calibration records and compares: those with JSON values (an object such
    as the MI reference is identified by where it is stored, not recorded)."""
    out = {}
    for key, value in settings.items():
        try:
            json.dumps(value)
        except TypeError:
            continue
        out[key] = value
    return out


def _detector_class(name: str, settings: dict[str, Any]) -> type[DetectorBase]:
    detector = make_detector(name, **settings)
    if not isinstance(detector, DetectorBase):
        raise DetectorError(f"detector {name!r} does not say which setting is its threshold")
    return type(detector)


class _one_numba_thread:
    """Run numba kernels on one thread meanwhile: the MI detector's small per-test kernels ran
    5x slower on two threads than on one on a busy 2-core machine."""

    def __enter__(self) -> None:
        import numba

        self._before = numba.get_num_threads()
        numba.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        import numba

        numba.set_num_threads(self._before)
