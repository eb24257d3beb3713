"""What every model-stealing detector shares: the verdict, the detector contract, the registry.

A detector watches one client's query stream (one instance per client and per detector kind).
``observe(x, predicted)`` feeds it a batch, which it handles query by query in order, and returns
the verdict after the batch's last query. Its whole state is a ``state_dict()`` of tensors,
numbers, strings, lists and dicts, so ``torch.save(..., weights_only=True)`` round-trips it and a
restarted service resumes every client's detector exactly where it stopped. A detector is not
thread-safe: the caller observes one client's batches one at a time, in arrival order.

``make_detector("prada", delta=0.95)`` builds a detector by name with validated keyword-only
settings. Errors::

    ValueError
     └── DetectorError   bad setting, bad batch (shape, dtype, range, labels), a state or
                          reference that does not fit the detector; the message names the value
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, final, runtime_checkable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DETECTORS",
    "DetectorBase",
    "DetectorError",
    "StealingDetector",
    "Verdict",
    "check_batch",
    "check_setting_names",
    "detector_class",
    "make_detector",
]


class DetectorError(ValueError):
    """A detector setting, input batch, saved state or reference that cannot be used."""


@dataclass(frozen=True)
class Verdict:
    """Whether the client is flagged, the detector's last test statistic (None before its first
    test) and the threshold that statistic is compared with."""

    flagged: bool
    statistic: float | None
    threshold: float


@runtime_checkable
class StealingDetector(Protocol):
    """One client's model-stealing detector (see the module docstring)."""

    name: str
    queries_seen: int
    first_alarm_at: int | None  # 1-based index of the query after which it first flagged

    def observe(self, x: Tensor, predicted: Tensor) -> Verdict:
        """Feed a batch: x (n, C, H, W) float in [0, 1] or uint8, predicted (n,) labels."""
        ...

    @property
    def verdict(self) -> Verdict:
        """The current verdict (what the last ``observe`` returned)."""
        ...

    def details(self) -> dict[str, int]:
        """Detector-specific figures for the admin view (PRADA: ``stored``, ``max_stored``)."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def check_batch(x: Any, predicted: Any) -> tuple[Tensor, Tensor]:
    """Validate one batch; return x as a contiguous (n, C, H, W) tensor and labels as int64 (n,).

    Floating images must be finite and within [0, 1]; integer images must be uint8.
    """
    if not isinstance(x, Tensor):
        x = torch.as_tensor(np.asarray(x))
    if not isinstance(predicted, Tensor):
        predicted = torch.as_tensor(np.asarray(predicted))
    if x.ndim != 4:
        raise DetectorError(f"x must have shape (n, C, H, W), got {tuple(x.shape)}")
    if x.is_floating_point():
        if x.numel():
            if not bool(torch.isfinite(x).all()):
                raise DetectorError("x must be finite, got NaN or inf")
            low, high = float(x.min()), float(x.max())
            if low < 0.0 or high > 1.0:
                raise DetectorError(f"float x must lie in [0, 1], got range [{low}, {high}]")
    elif x.dtype != torch.uint8:
        raise DetectorError(f"x must be float in [0, 1] or uint8, got dtype {x.dtype}")
    if predicted.ndim != 1 or predicted.is_floating_point() or predicted.is_complex():
        raise DetectorError(
            f"predicted must be a 1-D integer tensor, got shape {tuple(predicted.shape)} "
            f"dtype {predicted.dtype}"
        )
    if len(predicted) != len(x):
        raise DetectorError(
            f"x and predicted must have the same length, got {len(x)} and {len(predicted)}"
        )
    if len(predicted) and int(predicted.min()) < 0:
        raise DetectorError(f"predicted labels must be >= 0, got {int(predicted.min())}")
    return x.detach().cpu().contiguous(), predicted.detach().cpu().to(torch.int64)


class DetectorBase(ABC):
    """Shared bookkeeping: query count, first alarm, current verdict, input-shape pinning.

    ``observe`` is final: it validates the batch, pins the image shape on first use and hands
    the batch to ``_observe``, which must advance ``queries_seen`` and report every test through
    ``_set_verdict`` (which records ``first_alarm_at``).

    Every detector flags when its statistic falls below its threshold, and names the setting
    that holds the threshold in ``threshold_setting``: calibration (``defenses.calibration``)
    reads ``lowest_statistic`` from one unflagged run and sets that setting.
    """

    name: ClassVar[str]
    threshold_setting: ClassVar[str]

    def __init__(self, *, threshold: float) -> None:
        self.queries_seen = 0
        self.first_alarm_at: int | None = None
        self.input_shape: tuple[int, ...] | None = None
        self._verdict = Verdict(flagged=False, statistic=None, threshold=threshold)
        self.lowest_statistic = math.inf  # over every test since built (not saved in the state)

    @property
    def verdict(self) -> Verdict:
        return self._verdict

    @final
    def observe(self, x: Tensor, predicted: Tensor) -> Verdict:
        x, labels = check_batch(x, predicted)
        shape = tuple(x.shape[1:])
        if self.input_shape is None:
            self.input_shape = shape
        elif shape != self.input_shape:
            raise DetectorError(
                f"x must have image shape {self.input_shape} (this client's first query), "
                f"got {shape}"
            )
        if len(x):
            self._observe(x, labels)
        return self._verdict

    @abstractmethod
    def _observe(self, x: Tensor, labels: Tensor) -> None:
        """Process a validated, non-empty batch in order."""

    def _set_verdict(self, flagged: bool, statistic: float | None) -> None:
        """Record a test's outcome after query number ``queries_seen``."""
        self._verdict = Verdict(bool(flagged), statistic, self._verdict.threshold)
        if statistic is not None:
            self.lowest_statistic = min(self.lowest_statistic, statistic)
        if flagged and self.first_alarm_at is None:
            self.first_alarm_at = self.queries_seen

    def details(self) -> dict[str, int]:
        """Detector-specific figures for the admin view; none by default."""
        return {}

    def _base_state(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "queries_seen": self.queries_seen,
            "first_alarm_at": self.first_alarm_at,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "flagged": self._verdict.flagged,
            "statistic": self._verdict.statistic,
        }

    def _load_base_state(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise DetectorError(f"state must be a dict, got {type(state).__name__}")
        if state.get("kind") != self.name:
            raise DetectorError(f"state is for detector {state.get('kind')!r}, not {self.name!r}")
        self.queries_seen = int(state["queries_seen"])
        first = state["first_alarm_at"]
        self.first_alarm_at = None if first is None else int(first)
        shape = state["input_shape"]
        self.input_shape = None if shape is None else tuple(int(s) for s in shape)
        statistic = state["statistic"]
        self._verdict = Verdict(
            bool(state["flagged"]),
            None if statistic is None else float(statistic),
            self._verdict.threshold,
        )

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to resume: tensors, numbers, strings, lists, dicts."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()`` of a detector with the same settings."""


# name -> "module:Class", imported on first use (the detector modules import this one).
DETECTORS: dict[str, str] = {
    "prada": "defenses.prada:PradaDetector",
    "mi_redundancy": "defenses.mi_redundancy:MiRedundancyDetector",
}


def detector_class(name: str) -> type:
    """The class registered as ``name``."""
    try:
        target = DETECTORS[name]
    except (KeyError, TypeError):
        raise DetectorError(f"detector must be one of {sorted(DETECTORS)}, got {name!r}") from None
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def check_setting_names(name: str, settings: Mapping[str, Any]) -> None:
    """Refuse a detector name or setting name the detector does not have (its settings are the
    keyword-only parameters of its constructor), without building it: the service checks its
    configuration with this before it loads any model; values are checked by the constructor."""
    parameters = inspect.signature(detector_class(name)).parameters
    known = sorted(p.name for p in parameters.values() if p.kind is p.KEYWORD_ONLY)
    unknown = sorted(str(key) for key in settings if key not in known)
    if unknown:
        raise DetectorError(
            f"detector {name!r} has no setting(s) {unknown}; its settings are {known}"
        )


def make_detector(name: str, **settings: Any) -> StealingDetector:
    """The detector registered as ``name``, built with keyword-only ``settings`` (each
    constructor validates its values and names the bad one)."""
    check_setting_names(name, settings)
    try:
        return detector_class(name)(**settings)
    except TypeError as exc:  # e.g. a required setting left out
        raise DetectorError(f"bad settings for detector {name!r}: {exc}") from exc


# Validation helpers the detector modules share.


def check_int(name: str, value: object, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DetectorError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise DetectorError(f"{name} must be {bounds}, got {value}")
    return int(value)


def check_fraction(name: str, value: object, *, closed: bool = False) -> float:
    """A real number in the open interval (0, 1), or [0, 1] when ``closed``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(value)
        or not ((0.0 <= value <= 1.0) if closed else (0.0 < value < 1.0))
    ):
        interval = "[0, 1]" if closed else "(0, 1)"
        raise DetectorError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON, creating the folder (references, calibrations)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """Read a JSON file written by ``write_json``; a missing file or bad JSON names ``what``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DetectorError(f"{path} is not a valid {what}: {exc}") from exc
