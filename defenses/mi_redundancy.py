"""MI redundancy (DRMI paper, Section 7): flag a client whose recent queries are too different.

DRMI spends an attacker's budget on the least mutually-redundant images it can find, so its
queries have unusually low pairwise mutual information, while a benign client's natural queries
are more redundant: the same class recurs with similar strokes, and real clients repeat
themselves. The paper suggests measuring the redundancy of one client's queries against the
distribution benign clients show; this module does that over a sliding window.

The test (per client):

* The last ``window`` queries (default 100) are kept as uint8 images in a ring buffer, together
  with their pairwise MI matrix (Eq. 1, ``bins`` histogram bins, default 256). The matrix is
  updated incrementally: at each test, one ``mutual_information_cross`` of the queries that
  arrived since the last test against the window, i.e. about ``window`` MI pairs per query
  instead of ``window^2 / 2`` per test, in one kernel launch per ``test_every`` queries
  (whether they came one by one or in a batch, so both give identical results).
* After every ``test_every``-th query (default 10) of the client, once the window holds at least
  ``min_queries`` queries (default: a full window), the window statistic is computed:

      statistic = mean over the window's queries q of max over other window queries q' of MI(q, q')

  i.e. the mean "nearest redundancy": how much the typical query shares with its most similar
  neighbour. Flag when statistic < the reference threshold; between tests the last verdict
  stands.

Why this statistic: DRMI minimises the sum of MI^alpha within each class, which pushes every
chosen image away from its nearest same-class neighbour in MI; the nearest-neighbour MI is what
repeats and near-duplicates raise for a benign client, and a mean over the window is stable
(every query contributes). On the embedded MNIST splits, windows of 100 DRMI-selected queries
score about 0.40-0.49 nats, windows of 100 random natural images about 0.60-0.69, with or
without class-sorted order, so one threshold separates them with a wide margin. The mean of all
pairs separates too, but is dominated by cross-class pairs; the median of the nearest
redundancies is noisier.

The reference (``calibrate_mi_reference``) is measured once on held-out benign images: windows
of a simulated benign client (``defenses.benign.benign_stream``), the statistic of each, and the
threshold = their ``false_alarm_rate`` quantile, so about that fraction of benign windows falls
below it. The false-alarm rate is per test: a client tested many times will see more alarms
over its life (tests on overlapping windows are strongly correlated, so far fewer than
``tests x rate``). The default benign model has no repeats (``repeat_rate=0``, the paper's
"normal users submit random queries"): that is the least redundant benign client, so the
threshold does not assume repeats that some real clients never make. Calibrating with repeats
raises the threshold (catches more, but flags clients that repeat less than modelled).
The service replaces this per-window threshold with a per-client one when the model is
calibrated (``defenses.calibration``: at most a share of benign clients flagged within a
horizon, with and without near-duplicates); the reference still fixes window and bins.

A window with fewer than ``window`` queries has fewer neighbours per query, so lower nearest
redundancies; ``min_queries < window`` therefore tests partial windows against a full-window
threshold and raises false alarms early in a stream. The reference records the window, bins and
statistic it was measured with; a detector with other settings refuses it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from defenses.base import (
    DetectorBase,
    DetectorError,
    check_fraction,
    check_int,
    read_json,
    write_json,
)
from mlcore.streams import benign_stream

__all__ = [
    "STATISTIC",
    "MiRedundancyDetector",
    "MiReference",
    "calibrate_mi_reference",
    "window_statistic",
]

STATISTIC = "mean-nearest-mi"
_REFERENCE_VERSION = 1


def window_statistic(mi: np.ndarray) -> float:
    """Mean over queries of the largest MI to any other query, of a (w, w) MI matrix, w >= 2."""
    m = np.array(mi, dtype=np.float64, copy=True)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        raise DetectorError(f"mi must be a square (w, w) matrix with w >= 2, got {m.shape}")
    np.fill_diagonal(m, -np.inf)
    return float(m.max(axis=1).mean())


@dataclass(frozen=True)
class MiReference:
    """A benign reference: the threshold, the benign window statistics it came from, and the
    settings they were measured with (window, bins, statistic, benign model, data, seed).

    ``to_dict()`` is JSON-ready (save it with the model); ``from_dict`` validates it back.
    """

    threshold: float
    statistics: tuple[float, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False)  # the file it was loaded from

    @property
    def window(self) -> int:
        return int(self.settings["window"])

    @property
    def bins(self) -> int:
        return int(self.settings["bins"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": _REFERENCE_VERSION,
            "threshold": self.threshold,
            "statistics": list(self.statistics),
            "settings": dict(self.settings),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MiReference:
        if not isinstance(data, Mapping):
            raise DetectorError(f"an MI reference must be a dict, got {type(data).__name__}")
        if data.get("version") != _REFERENCE_VERSION:
            raise DetectorError(
                f"MI reference version must be {_REFERENCE_VERSION}, got {data.get('version')!r}"
            )
        try:
            threshold = float(data["threshold"])
            statistics = tuple(float(s) for s in data["statistics"])
            settings = dict(data["settings"])
            window, bins = settings["window"], settings["bins"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DetectorError(f"not a valid MI reference: {exc!r}") from exc
        if not math.isfinite(threshold) or not statistics:
            raise DetectorError(
                f"MI reference needs a finite threshold and statistics, got {threshold}"
            )
        check_int("reference window", window, low=2)
        check_int("reference bins", bins, low=2, high=256)
        if settings.get("statistic") != STATISTIC:
            raise DetectorError(
                f"MI reference statistic must be {STATISTIC!r}, got {settings.get('statistic')!r}"
            )
        return cls(threshold, statistics, settings)

    def save(self, path: str | os.PathLike[str]) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MiReference:
        path = Path(path)
        try:
            return replace(cls.from_dict(read_json(path, "MI reference")), source=str(path))
        except DetectorError as exc:
            raise DetectorError(f"{path} is not a valid MI reference: {exc}") from exc


def calibrate_mi_reference(
    benign_images: Any,
    *,
    window: int = 100,
    n_windows: int = 200,
    seed: int = 0,
    false_alarm_rate: float = 0.01,
    bins: int = 256,
    repeat_rate: float = 0.0,
    noise: float = 0.0,
    recent: int = 100,
) -> MiReference:
    """Measure the benign window statistic on ``n_windows`` simulated benign windows.

    Each window is a fresh ``benign_stream(benign_images, window, repeat_rate=..., noise=...,
    recent=...)``; the threshold is the ``false_alarm_rate`` quantile of their statistics, so
    it needs ``n_windows * false_alarm_rate >= 1`` (no extrapolating past the sample).
    """
    from mlcore.mutual_information import mutual_information_matrix

    images = benign_images if isinstance(benign_images, Tensor) else torch.as_tensor(benign_images)
    window = check_int("window", window, low=2)
    n_windows = check_int("n_windows", n_windows, low=1)
    seed = check_int("seed", seed, low=0)
    rate = check_fraction("false_alarm_rate", false_alarm_rate)
    bins = check_int("bins", bins, low=2, high=256)
    if n_windows * rate < 1:
        raise DetectorError(
            f"false_alarm_rate={rate} needs n_windows >= {math.ceil(1 / rate)}, got {n_windows}"
        )
    if images.ndim < 2 or len(images) < window:
        raise DetectorError(
            f"benign_images must hold at least window={window} images, got shape "
            f"{tuple(images.shape)}"
        )
    window_seeds = np.random.SeedSequence(seed).generate_state(n_windows)
    statistics = []
    for window_seed in window_seeds:
        stream = benign_stream(
            images,
            window,
            repeat_rate=repeat_rate,
            noise=noise,
            recent=recent,
            seed=int(window_seed),
        )
        statistics.append(window_statistic(mutual_information_matrix(stream.images, bins=bins)))
    threshold = float(np.quantile(statistics, rate))
    settings = {
        "window": window,
        "bins": bins,
        "statistic": STATISTIC,
        "false_alarm_rate": rate,
        "n_windows": n_windows,
        "seed": seed,
        "repeat_rate": float(repeat_rate),
        "noise": float(noise),
        "recent": recent,
        "n_images": len(images),
        "image_shape": list(images.shape[1:]),
    }
    return MiReference(threshold, tuple(statistics), settings)


def _as_reference(reference: Any) -> MiReference:
    if isinstance(reference, MiReference):
        return reference
    if isinstance(reference, (str, os.PathLike)):
        return MiReference.load(reference)
    if isinstance(reference, Mapping):
        return MiReference.from_dict(reference)
    raise DetectorError(
        f"reference must be an MiReference, its dict or a JSON file path, got "
        f"{type(reference).__name__}"
    )


class MiRedundancyDetector(DetectorBase):
    """The window test of the module docstring, against a benign ``reference``.

    ``window`` and ``bins`` default to the reference's and must equal them when given.
    ``threshold`` defaults to the reference's (its per-window quantile); a per-client
    calibration (``defenses.calibration``) sets it instead.
    """

    name: ClassVar[str] = "mi_redundancy"
    threshold_setting: ClassVar[str] = "threshold"

    def __init__(
        self,
        *,
        reference: MiReference | Mapping[str, Any] | str | os.PathLike[str],
        window: int | None = None,
        bins: int | None = None,
        test_every: int = 10,
        min_queries: int | None = None,
        threshold: float | None = None,
    ) -> None:
        ref = _as_reference(reference)
        for setting, value, expected in (("window", window, ref.window), ("bins", bins, ref.bins)):
            if value is not None and value != expected:
                where = "" if ref.source is None else f" {ref.source}"
                raise DetectorError(
                    f"{setting}={value!r} does not match the reference{where}, which was "
                    f"calibrated with {setting}={expected}; recalibrate or use {setting}={expected}"
                )
        self.reference = ref
        self.window = check_int("window", ref.window, low=2)
        self.bins = check_int("bins", ref.bins, low=2, high=256)
        self.test_every = check_int("test_every", test_every, low=1, high=self.window)
        self.min_queries = (
            self.window
            if min_queries is None
            else check_int("min_queries", min_queries, low=2, high=self.window)
        )
        if threshold is None:
            threshold = ref.threshold
        elif (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float, np.integer, np.floating))
            or not math.isfinite(threshold)
        ):
            raise DetectorError(f"threshold must be a finite number, got {threshold!r}")
        self.threshold = float(threshold)
        super().__init__(threshold=self.threshold)
        self._buffer: np.ndarray | None = None  # (window, pixels) uint8; slot t % window
        self._mi = np.zeros((self.window, self.window))
        self._pending = 0  # newest queries whose MI rows are not computed yet (< test_every)

    @property
    def filled(self) -> int:
        """Queries currently in the window."""
        return min(self.queries_seen, self.window)

    def _observe(self, x: Tensor, labels: Tensor) -> None:
        from mlcore.mutual_information import quantise

        q = quantise(x, bins=256)  # raw 8-bit values; ``bins`` applies inside the MI
        if self._buffer is None:
            self._buffer = np.zeros((self.window, q.shape[1]), dtype=np.uint8)
        start = 0
        while start < len(q):  # chunks end where a test is due
            size = min(len(q) - start, self.test_every - self.queries_seen % self.test_every)
            slots = (self.queries_seen + np.arange(size)) % self.window
            self._buffer[slots] = q[start : start + size]
            self.queries_seen += size
            self._pending += size
            start += size
            if self.queries_seen % self.test_every == 0:
                self._update_mi()
                if self.filled >= self.min_queries:
                    statistic = window_statistic(self._mi[: self.filled, : self.filled])
                    self._set_verdict(statistic < self.threshold, statistic)

    def _update_mi(self) -> None:
        """MI of the queries that arrived since the last test (at most ``test_every`` <= window,
        so none was overwritten yet) against the whole window: one cross-MI call, whether they
        came one at a time or in a batch, so both give identical matrices."""
        from mlcore.mutual_information import mutual_information_cross

        assert self._buffer is not None
        filled = self.filled
        slots = (self.queries_seen - self._pending + np.arange(self._pending)) % self.window
        cross = mutual_information_cross(self._buffer[slots], self._buffer[:filled], bins=self.bins)
        self._mi[slots, :filled] = cross
        self._mi[:filled, slots] = cross.T
        self._pending = 0

    def state_dict(self) -> dict:
        state = self._base_state()
        filled = self.filled
        buffer = np.zeros((0, 0), np.uint8) if self._buffer is None else self._buffer[:filled]
        state.update(
            window=self.window,
            bins=self.bins,
            test_every=self.test_every,
            buffer=torch.from_numpy(buffer.copy()),
            mi=torch.from_numpy(self._mi[:filled, :filled].copy()),
            pending=self._pending,
        )
        return state

    def load_state_dict(self, state: dict) -> None:
        try:
            self._load_state(state)
        except (KeyError, TypeError, AttributeError, RuntimeError) as exc:
            raise DetectorError(f"not a valid MI-redundancy state: {exc!r}") from exc

    def _load_state(self, state: dict) -> None:
        for setting in ("window", "bins", "test_every"):
            if state[setting] != getattr(self, setting):
                raise DetectorError(
                    f"state has {setting}={state[setting]!r}, this detector "
                    f"{setting}={getattr(self, setting)}"
                )
        self._load_base_state(state)
        filled = self.filled
        buffer, mi = state["buffer"].numpy(), state["mi"].double().numpy()
        self._mi = np.zeros((self.window, self.window))
        self._pending = check_int(
            "state pending", state["pending"], low=0, high=min(filled, self.test_every - 1)
        )
        if self.input_shape is None:
            self._buffer = None
            return
        pixels = math.prod(self.input_shape)
        if buffer.shape != (filled, pixels) or buffer.dtype != np.uint8:
            raise DetectorError(
                f"state buffer must be uint8 ({filled}, {pixels}), got {buffer.dtype} "
                f"{buffer.shape}"
            )
        if mi.shape != (filled, filled):
            raise DetectorError(f"state mi must be ({filled}, {filled}), got {mi.shape}")
        self._buffer = np.zeros((self.window, pixels), dtype=np.uint8)
        self._buffer[:filled] = buffer
        self._mi[:filled, :filled] = mi
