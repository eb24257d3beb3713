"""Every client's model-stealing detectors: one instance per (client, model, detector kind).

Durability is by event sourcing. Each charged request's images and answered labels go into the
``query_log`` in the same transaction as the charge (``StateStore.charge``), so a detector's
state is always "last snapshot + replay of the log after it". Alarms are written the moment a
detector first fires; snapshots (compressed ``.npz`` files under ``<state_dir>/detectors``, see
``target_service.snapshots``) are written every
``snapshot_every`` queries and at shutdown, only to bound the replay. A ``kill -9`` therefore
loses no query a detector should have seen and no alarm it raised.

A stream's requests are serialised by a per-(client, model) lock held from ``catch_up`` through
the charge to the end of ``observe``, so detectors see queries in ledger order, and a ``block``
alarm raised by one request is seen by the next one before it is charged.

Every detector is built once at start-up (``build_detectors``), so a bad setting or reference
stops the service with a message naming it; each client's detectors are copies of those.

A detector that raises never goes quiet: it is put in error (the admin views show
``status: "error"`` and the message, the ``detector_errors`` table keeps it across restarts,
``mlaas_detector_errors`` counts it) and skipped; the other detectors go on. On the client's
next request (``catch_up``), or when the stream is loaded after a restart, it is rebuilt from
the last snapshot and the query log, so once it works again it has seen every charged query.
While a stream has a detector in error its snapshot is not rewritten (the old one stays the
point to rebuild from).

``TARGET_DETECTION_MODE=worker`` takes the detectors off the request path: requests only log
their queries, a ``target-service detect`` process (``target_service.detect_worker``) feeds them
to its own hub through ``advance`` and records the alarms, and this process's hub
(``inline=False``) reads alarms from the store to block, observes nothing, writes no snapshot
and rebuilds a stream from the snapshot and the log only for the admin views.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from defenses.base import DetectorError, StealingDetector, Verdict, make_detector
from target_service.metrics import ServiceMetrics
from target_service.snapshots import read_snapshot, write_snapshot
from target_service.state import StateStore

logger = logging.getLogger(__name__)

AlarmPolicy = Literal["log", "block"]
# (stream, model, after) -> (entry_id, images, labels) of the logged requests after ``after``
LogReader = Callable[[str, str, int], Iterable[tuple[int, np.ndarray, list[int]]]]
# (stream, model, detector, first_alarm_at, verdict): a detector's first alarm on a stream
AlarmSink = Callable[[str, str, str, int, Verdict], None]


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
    failed: dict[str, str] = field(default_factory=dict)  # detector -> error, until rebuilt


MAX_ERROR_CHARS = 500  # of a detector's error message kept for the admin views


def build_detectors(configs: dict[str, DefenceConfig]) -> dict[str, dict[str, StealingDetector]]:
    """One fresh detector per hosted model and detector kind, built at start-up: the one place
    detector values and references are checked against the detectors (names are checked earlier,
    in ``Settings``). Raises DetectorError naming the model, the detector and the bad value."""
    built: dict[str, dict[str, StealingDetector]] = {}
    for model, config in configs.items():
        built[model] = {}
        for name, settings in config.detectors.items():
            try:
                built[model][name] = make_detector(name, **settings)
            except (DetectorError, OSError) as exc:
                raise DetectorError(f"TARGET_DETECTORS[{model!r}][{name!r}]: {exc}") from exc
    return built


class DetectionHub:
    def __init__(
        self,
        store: StateStore,
        configs: dict[str, DefenceConfig],
        *,
        snapshot_dir: Path,
        metrics: ServiceMetrics,
        snapshot_every: int = 1000,
        inline: bool = True,
        read_log: LogReader | None = None,
        on_alarm: AlarmSink | None = None,
    ) -> None:
        """``inline``: requests feed the detectors (else a detection worker does, see the module
        docstring); ``read_log`` and ``on_alarm`` replace reading a client's query log and
        recording an alarm at once (the detection worker's group streams and transactions)."""
        self.store = store
        self.inline = inline
        self._read_log: LogReader = read_log or (
            lambda client_id, model, after: store.query_log(client_id, model, after=after)
        )
        self._on_alarm: AlarmSink = on_alarm or (
            self._record_alarm if inline else lambda *_alarm: None
        )
        self.configs = configs
        self.snapshot_dir = snapshot_dir
        self.metrics = metrics
        self.snapshot_every = snapshot_every
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()
        self._prototypes = build_detectors(configs)
        self._alarmed = {(a["client_id"], a["model"], a["detector"]) for a in store.list_alarms()}
        self._errored = {
            (e["client_id"], e["model"], e["detector"]) for e in store.list_detector_errors()
        }

    def add_model(self, model: str, config: DefenceConfig) -> None:
        """Watch a model hosted after start-up (a client's trained model); raises
        DetectorError if its detector settings do not build."""
        prototypes = build_detectors({model: config})
        with self._guard:
            self._prototypes.update(prototypes)
            self.configs[model] = config

    def warm_up(self, model: str, input_shape: tuple[int, ...]) -> None:
        """Feed a throwaway copy of each of the model's detectors two blank images of one class,
        so that first-use costs (lazy imports, JIT compilation) are paid now, not in the first
        stream's detection lag."""
        x = torch.stack([torch.zeros(input_shape), torch.ones(input_shape)])
        for prototype in self._prototypes.get(model, {}).values():
            copy.deepcopy(prototype).observe(x, torch.zeros(2, dtype=torch.int64))

    def watches(self, model: str) -> bool:
        config = self.configs.get(model)
        return config is not None and bool(config.detectors)

    def is_blocked(self, client_id: str, model: str) -> bool:
        """True once any detector fired on this stream and the model's policy is ``block``."""
        config = self.configs.get(model)
        if config is None or config.alarm_policy != "block":
            return False
        if not self.inline:  # the detection worker records alarms (on the client or its org)
            return self.store.alarm_blocks(client_id, model, list(config.detectors))
        return any((client_id, model, name) in self._alarmed for name in config.detectors)

    @contextmanager
    def stream_lock(self, client_id: str, model: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault((client_id, model), threading.Lock())
        with lock:
            yield

    def catch_up(self, client_id: str, model: str) -> None:
        """Load the stream and rebuild its detectors in error from the query log (call under
        ``stream_lock``, before charging, so an alarm they raise on replay blocks this request)."""
        stream = self._stream(client_id, model)
        if stream.failed:
            self._rebuild(client_id, model, stream, list(stream.failed))

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
        if stream.since_snapshot >= self.snapshot_every and not stream.failed:
            self._snapshot(client_id, model, stream)

    def advance(self, client_id: str, model: str) -> int:
        """Feed the stream every logged request its detectors have not seen (loading it first:
        snapshot and replay), rebuilding detectors in error; returns the stream's last entry."""
        with self.stream_lock(client_id, model):
            if (client_id, model) not in self._streams:
                return self._stream(client_id, model).through_entry  # replayed to the log's end
            stream = self._streams[(client_id, model)]
            if stream.failed:
                self._rebuild(client_id, model, stream, list(stream.failed))
            for entry_id, images, labels in self._read_log(client_id, model, stream.through_entry):
                self._feed(client_id, model, stream, images, labels)
                stream.through_entry = entry_id
                stream.since_snapshot += len(images)
            return stream.through_entry

    def save_snapshot(self, client_id: str, model: str, *, due_only: bool) -> None:
        """Write a loaded stream's snapshot if it saw queries since the last one (with
        ``due_only``, ``snapshot_every`` of them); never while a detector is in error."""
        stream = self._streams.get((client_id, model))
        if stream is None or stream.failed or not stream.since_snapshot:
            return
        if not due_only or stream.since_snapshot >= self.snapshot_every:
            self._snapshot(client_id, model, stream)

    def forget(self, client_id: str, model: str) -> None:
        """Drop a stream from memory (the next use rebuilds it from its snapshot and the log)."""
        self._streams.pop((client_id, model), None)

    def view(self, client_id: str, model: str) -> dict[str, dict[str, Any]]:
        """Each detector's first alarm, current statistic and threshold for one stream."""
        if not self.inline:
            self.advance(client_id, model)
        with self.stream_lock(client_id, model):
            stream = self._stream(client_id, model)
            return {
                name: {
                    "first_alarm_at": detector.first_alarm_at,
                    "statistic": detector.verdict.statistic,
                    "threshold": detector.verdict.threshold,
                    "queries_seen": detector.queries_seen,
                    "status": "error" if name in stream.failed else "ok",
                    "message": stream.failed.get(name),
                    **detector.details(),
                }
                for name, detector in stream.detectors.items()
            }

    def close(self) -> None:
        """Snapshot every loaded stream, so the next start replays nothing (a stream with a
        detector in error keeps its last good snapshot, to rebuild that detector from)."""
        if not self.inline:  # the detection worker owns the snapshots
            return
        for (client_id, model), stream in list(self._streams.items()):
            if stream.since_snapshot and not stream.failed:
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
        stream = _Stream({}, through_entry=0)
        replayed = self._rebuild(
            client_id, model, stream, list(self.configs[model].detectors), to_end=True
        )
        stream.since_snapshot = replayed
        if replayed:
            logger.info(
                "replayed %d queries of client %s on %s into its detectors",
                replayed,
                client_id,
                model,
            )
        return stream

    def _rebuild(
        self, client_id: str, model: str, stream: _Stream, names: list[str], *, to_end: bool = False
    ) -> int:
        """Restore the detectors ``names`` from the latest snapshot and replay the query log into
        them, up to the stream's last observed entry (or, when loading, to the log's end and
        moving ``through_entry`` there). A detector the snapshot lacks or cannot restore starts
        afresh from the log's first entry. Returns the queries replayed."""
        saved = self._read_snapshot(client_id, model)
        positions: dict[str, int] = {}
        for name in names:
            stream.failed.pop(name, None)
            stream.detectors[name], positions[name] = self._restore(client_id, model, name, saved)
        if to_end:  # the snapshot's entry, even when no query came after it
            stream.through_entry = max([stream.through_entry, *positions.values()])
        replayed = 0
        after = min(positions.values(), default=stream.through_entry)
        for entry_id, images, labels in self._read_log(client_id, model, after):
            if not to_end and (
                entry_id > stream.through_entry or all(n in stream.failed for n in names)
            ):
                break
            behind = [n for n in names if positions[n] < entry_id and n not in stream.failed]
            self._feed(client_id, model, stream, images, labels, behind)
            replayed += len(images)
            if to_end:
                stream.through_entry = entry_id
        for name in names:
            if name not in stream.failed and (client_id, model, name) in self._errored:
                self.store.clear_detector_error(client_id, model=model, detector=name)
                self._errored.discard((client_id, model, name))
                logger.info(
                    "detector %s works again on client %s, model %s: rebuilt from the query log",
                    name,
                    client_id,
                    model,
                )
        return replayed

    def _read_snapshot(self, client_id: str, model: str) -> dict[str, Any] | None:
        """The stream's latest snapshot, or None when there is none or it cannot be read."""
        path = self._snapshot_path(client_id, model)
        if not path.exists():
            return None
        try:
            return read_snapshot(path)
        except Exception as exc:  # a torn or foreign file: the query log still has everything
            logger.warning("ignoring unreadable detector snapshot %s: %r", path, exc)
            return None

    def _restore(
        self, client_id: str, model: str, name: str, saved: dict[str, Any] | None
    ) -> tuple[StealingDetector, int]:
        """A copy of the start-up detector with its state from ``saved``, and the last entry
        that state has seen; a fresh copy and entry 0 when it has no usable state there."""
        detector = copy.deepcopy(self._prototypes[model][name])
        if saved is None:
            return detector, 0
        try:
            detector.load_state_dict(saved["detectors"][name])
            return detector, int(saved["through_entry"])
        except Exception as exc:
            logger.warning(
                "the snapshot of %s for client %s on %s does not restore (%r): replaying its "
                "whole query log",
                name,
                client_id,
                model,
                exc,
            )
            return copy.deepcopy(self._prototypes[model][name]), 0

    def _feed(
        self,
        client_id: str,
        model: str,
        stream: _Stream,
        images: np.ndarray,
        labels: list[int],
        names: list[str] | None = None,
    ) -> None:
        """Feed one logged request to the detectors ``names`` (default: every one not in error)
        and record new alarms at once; a detector that raises is put in error and skipped."""
        x = torch.from_numpy(np.require(images, requirements=["C", "W"]))  # log rows are read-only
        predicted = torch.as_tensor(labels, dtype=torch.int64)
        if names is None:
            names = [name for name in stream.detectors if name not in stream.failed]
        for name in names:
            detector = stream.detectors[name]
            seen = detector.queries_seen
            try:
                verdict = detector.observe(x, predicted)
            except Exception as exc:
                self._fail(client_id, model, stream, name, seen + len(images), exc)
                continue
            if (
                detector.first_alarm_at is not None
                and (client_id, model, name) not in self._alarmed
            ):
                self._on_alarm(client_id, model, name, detector.first_alarm_at, verdict)
                self._alarmed.add((client_id, model, name))
                self.metrics.alarms.labels(model, name).inc()
                logger.warning(
                    "%s flagged client %s on %s at query %d",
                    name,
                    client_id,
                    model,
                    detector.first_alarm_at,
                )

    def _record_alarm(
        self, client_id: str, model: str, name: str, query_index: int, verdict: Verdict
    ) -> None:
        self.store.record_alarm(
            client_id,
            model=model,
            detector=name,
            query_index=query_index,
            statistic=verdict.statistic,
            threshold=verdict.threshold,
        )

    def _fail(
        self,
        client_id: str,
        model: str,
        stream: _Stream,
        name: str,
        query_index: int,
        exc: Exception,
    ) -> None:
        """Put a detector in error: kept, counted and logged until a rebuild succeeds."""
        message = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        stream.failed[name] = message
        self.store.record_detector_error(
            client_id, model=model, detector=name, query_index=query_index, message=message
        )
        self._errored.add((client_id, model, name))
        self.metrics.detector_errors.labels(model, name).inc()
        logger.error(
            "detector %s failed on client %s, model %s, at query %d (rebuilt from the query log "
            "on the client's next request)",
            name,
            client_id,
            model,
            query_index,
            exc_info=exc,
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
