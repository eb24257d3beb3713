"""Detector kinds that misbehave on demand, registered in ``defenses.base.DETECTORS`` by the
tests that use them (see ``register`` in test_detector_faults.py). Their switches are class
attributes, so every client's copy of a detector obeys them."""

from __future__ import annotations

import threading
from typing import ClassVar

from torch import Tensor

from defenses.base import DetectorBase, check_int


class FlakyDetector(DetectorBase):
    """Counts queries and never flags; while ``failing`` is set it raises half-way through a
    batch (after counting its first query), as a detector with a bug would."""

    name: ClassVar[str] = "flaky"
    failing: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__(threshold=0.0)

    def _observe(self, x: Tensor, labels: Tensor) -> None:
        self.queries_seen += 1
        if type(self).failing:
            raise RuntimeError("injected failure")
        self.queries_seen += len(x) - 1

    def state_dict(self) -> dict:
        return self._base_state()

    def load_state_dict(self, state: dict) -> None:
        self._load_base_state(state)


class TripDetector(DetectorBase):
    """Flags at query ``at``; before it reports that alarm it sets ``entered`` and waits for
    ``release``, so a test can send other requests while the alarming one is being observed."""

    name: ClassVar[str] = "trip"
    entered: ClassVar[threading.Event] = threading.Event()
    release: ClassVar[threading.Event] = threading.Event()

    def __init__(self, *, at: int) -> None:
        self.at = check_int("at", at, low=1)
        super().__init__(threshold=float(self.at))

    def _observe(self, x: Tensor, labels: Tensor) -> None:
        before = self.queries_seen
        self.queries_seen += len(x)
        if before < self.at <= self.queries_seen:
            type(self).entered.set()
            type(self).release.wait(timeout=30)
            self._set_verdict(True, float(self.queries_seen))

    def state_dict(self) -> dict:
        return self._base_state()

    def load_state_dict(self, state: dict) -> None:
        self._load_base_state(state)
