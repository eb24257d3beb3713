"""Every client's model-stealing detectors: one instance per (client, model, detector kind).

Durability is by event sourcing. Each charged request's images and answered labels go into the
``query_log`` in the same transaction as the charge (``StateStore.charge``), so a detector's
state is always "last snapshot + replay of the log after it". Alarms are written the moment a
detector first fires; snapshots (compressed ``.npz`` files under ``<state_dir>/detectors``, see
``target_service.snapshots``) are written every
``snapshot_every`` queries and at shutdown, only to bound the replay. A ``kill -9`` therefore
loses no query a detector should have seen and no alarm it raised.

A stream's requests are serialised by a per-(client, model) lock held from the charge to the
end of ``observe``, so detectors see queries in ledger order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from defenses.base import StealingDetector, make_detector
from target_service.metrics import ServiceMetrics
from target_service.snapshots import read_snapshot, write_snapshot
from target_service.state import StateStore

logger = logging.getLogger(__name__)

AlarmPolicy = Literal["log", "block"]


@dataclass(frozen=True)
class DefenceConfig:
    """What watches one hosted model: detector settings by name, and what an alarm does."""

    detectors: dict[str, dict[str, Any]] = field(default_factory=dict)
    alarm_policy: AlarmPolicy = "log"


@dataclass
class _Stream:
    detectors: dict[str, StealingDetector]
    through_entry: int  # the last ledger entry the detectors have observed
    since_snapshot: int = 0


class DetectionHub:
    def __init__(
        self,
        store: StateStore,
        configs: dict[str, DefenceConfig],
        *,
        snapshot_dir: Path,
        metrics: ServiceMetrics,
        snapshot_every: int = 1000,
    ) -> None:
        self.store = store
        self.configs = configs
        self.snapshot_dir = snapshot_dir
        self.metrics = metrics
        self.snapshot_every = snapshot_every
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()
        self._alarmed = {(a["client_id"], a["model"], a["detector"]) for a in store.list_alarms()}

    def watches(self, model: str) -> bool:
        config = self.configs.get(model)
        return config is not None and bool(config.detectors)

    def is_blocked(self, client_id: str, model: str) -> bool:
        """True once any detector fired on this stream and the model's policy is ``block``."""
        config = self.configs.get(model)
        if config is None or config.alarm_policy != "block":
            return False
        return any((client_id, model, name) in self._alarmed for name in config.detectors)

    @contextmanager
    def stream_lock(self, client_id: str, model: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault((client_id, model), threading.Lock())
        with lock:
            yield

    def observe(
        self, client_id: str, model: str, images: np.ndarray, labels: list[int], entry_id: int
    ) -> None:
        """Feed one charged request (call under ``stream_lock``); record new alarms at once."""
        stream = self._stream(client_id, model)
        if entry_id <= stream.through_entry:
            return  # already replayed from the log
        self._feed(client_id, model, stream, images, labels)
        stream.through_entry = entry_id
        stream.since_snapshot += len(images)
        if stream.since_snapshot >= self.snapshot_every:
            self._snapshot(client_id, model, stream)

    def view(self, client_id: str, model: str) -> dict[str, dict[str, Any]]:
        """Each detector's first alarm, current statistic and threshold for one stream."""
        with self.stream_lock(client_id, model):
            stream = self._stream(client_id, model)
            return {
                name: {
                    "first_alarm_at": detector.first_alarm_at,
                    "statistic": detector.verdict.statistic,
                    "threshold": detector.verdict.threshold,
                    "queries_seen": detector.queries_seen,
                    **detector.details(),
                }
                for name, detector in stream.detectors.items()
            }

    def close(self) -> None:
        """Snapshot every loaded stream, so the next start replays nothing."""
        for (client_id, model), stream in list(self._streams.items()):
            if stream.since_snapshot:
                self._snapshot(client_id, model, stream)

    # -- internals -----------------------------------------------------------------------------
    def _stream(self, client_id: str, model: str) -> _Stream:
        key = (client_id, model)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._load(client_id, model)
            self._streams[key] = stream
        return stream

    def _load(self, client_id: str, model: str) -> _Stream:
        """Latest snapshot (if any), then replay of the query log after it."""
        config = self.configs[model]
        detectors = {
            name: make_detector(name, **settings) for name, settings in config.detectors.items()
        }
        through = 0
        path = self._snapshot_path(client_id, model)
        if path.exists():
            saved = read_snapshot(path)
            for name, detector in detectors.items():
                detector.load_state_dict(saved["detectors"][name])
            through = int(saved["through_entry"])
        stream = _Stream(detectors, through)
        replayed = 0
        for entry_id, images, labels in self.store.query_log(client_id, model, after=through):
            self._feed(client_id, model, stream, images, labels)
            stream.through_entry = entry_id
            replayed += len(images)
        stream.since_snapshot = replayed
        if replayed:
            logger.info(
                "replayed %d queries of client %s on %s into its detectors",
                replayed,
                client_id,
                model,
            )
        return stream

    def _feed(
        self, client_id: str, model: str, stream: _Stream, images: np.ndarray, labels: list[int]
    ) -> None:
        x = torch.from_numpy(np.require(images, requirements=["C", "W"]))  # log rows are read-only
        predicted = torch.as_tensor(labels, dtype=torch.int64)
        for name, detector in stream.detectors.items():
            verdict = detector.observe(x, predicted)
            if (
                detector.first_alarm_at is not None
                and (client_id, model, name) not in self._alarmed
            ):
                self.store.record_alarm(
                    client_id,
                    model=model,
                    detector=name,
                    query_index=detector.first_alarm_at,
                    statistic=verdict.statistic,
                    threshold=verdict.threshold,
                )
                self._alarmed.add((client_id, model, name))
                self.metrics.alarms.labels(model, name).inc()
                logger.warning(
                    "%s flagged client %s on %s at query %d",
                    name,
                    client_id,
                    model,
                    detector.first_alarm_at,
                )

    def _snapshot_path(self, client_id: str, model: str) -> Path:
        return self.snapshot_dir / client_id / f"{model}.npz"

    def _snapshot(self, client_id: str, model: str, stream: _Stream) -> None:
        path = self._snapshot_path(client_id, model)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "through_entry": stream.through_entry,
            "detectors": {
                name: detector.state_dict() for name, detector in stream.detectors.items()
            },
        }
        tmp = path.with_suffix(".tmp")
        write_snapshot(tmp, payload)
        tmp.replace(path)
        stream.since_snapshot = 0
