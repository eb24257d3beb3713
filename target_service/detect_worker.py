"""``target-service detect``: the model-stealing detectors off the request path.

With ``TARGET_DETECTION_MODE=worker`` a predict request only writes its images and labels to the
``query_log`` (in the transaction of its charge); detection workers, processes of their own,
feed them to the detectors and record the alarms, which the service then reads to ``block``.

- **Streams.** A stream is one model's queries from one client and, as
  ``TARGET_DETECTION_GROUPS`` says, also from one org's clients together ('org:<org>') or from
  every client ('all'); its detectors see its queries in ledger order, so an org's detectors see
  the union of its accounts' queries and report their first alarm in union queries.
- **Leases.** Each stream has a row in ``detection_leases``: its owner (a worker's random token),
  the lease's expiry, and the cursor (the last entry its detectors saw). A worker takes a stream
  that is free, or whose owner's lease ran out, with one conditional upsert, and renews its
  leases every pass; so a stream has one owner at a time, and a killed worker's streams pass to
  another after ``TARGET_DETECTION_LEASE_SECONDS``.
- **Exactly once.** The cursor moves in the same transaction as the alarms the queries up to it
  raised, and only while the worker still owns the stream; a snapshot (``detection.py``) is
  written only after its entry is committed. A worker that takes a stream over rebuilds its
  detectors from the latest snapshot (never past the cursor) and the log after it, so every
  query is seen once by the detectors whose alarms count, and the alarms a rebuilt detector
  raises again are the same first alarms (kept once).
- **Sharing.** A worker takes at most one new stream per pass, so workers started together
  share the streams instead of the first one taking them all; it renews its leases every third
  of the lease while it reads a stream's log, and stops reading a stream it has lost.
- **Stopping.** SIGTERM (or SIGINT) finishes the pass, snapshots the streams it holds and frees
  their leases, so another worker resumes at once.

The service's entry ids increase in commit order on SQLite (one writer), which a worker's
incremental scan (``detection_streams(after=...)``) relies on.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from types import FrameType
from typing import Any

import numpy as np

from defenses.base import Verdict
from target_service.detection import DefenceConfig, DetectionHub
from target_service.metrics import ServiceMetrics
from target_service.settings import Settings
from target_service.state import StateStore, open_store
from target_service.zoo import HostedModel, load_hosted, load_user_model

logger = logging.getLogger(__name__)

NEW_STREAMS_PER_PASS = 1
DISCOVERY_LOOKBACK = 10_000  # far more entries than can be in flight at once
GROUP_PREFIX = "org:"
ALL_CLIENTS = "all"


class LeaseLost(Exception):
    """Another worker took the stream this worker was reading."""


class DetectionWorker:
    """One worker's streams, detectors and pending alarms (``run`` loops over ``step``)."""

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        configs: dict[str, DefenceConfig],
        *,
        token: str | None = None,
    ) -> None:
        self.settings, self.store = settings, store
        self.token = token or uuid.uuid4().hex
        self.lease_seconds = settings.detection_lease_seconds
        self.hub = DetectionHub(
            store,
            dict(configs),
            snapshot_dir=settings.state_dir / "detectors",
            metrics=ServiceMetrics(),
            snapshot_every=settings.snapshot_every,
            read_log=self._read_log,
            on_alarm=self._on_alarm,
        )
        self.held: set[tuple[str, str]] = set()
        self._last_entry: dict[tuple[str, str], int] = {}  # per stream, the log's last entry
        self._seen_through = 0  # entries up to here are in _last_entry
        self._pending: list[dict[str, Any]] = []  # alarms not yet committed
        self._reading_client = ""  # the client of the entry being fed (for group alarms)
        self._renewed = 0.0  # time.monotonic() of the last renewal

    # -- one pass --------------------------------------------------------------------------------
    def step(self) -> int:
        """Renew leases, take free streams with new queries, feed them; returns how many
        streams moved."""
        self._renew()
        self._discover()
        cursors = {
            (row["stream"], row["model"]): row["through_entry"]
            for row in self.store.detection_leases()
        }
        moved, claimed = 0, 0
        for key, last in sorted(self._last_entry.items()):
            if last <= cursors.get(key, 0):
                continue
            if key not in self.held:
                if claimed >= NEW_STREAMS_PER_PASS or not self._claim(*key):
                    continue
                claimed += 1
            if self._advance(*key):
                moved += 1
        return moved

    def _renew(self) -> None:
        held = self.store.renew_detection_leases(self.token, lease_seconds=self.lease_seconds)
        self._renewed = time.monotonic()
        for lost in self.held - held:
            logger.warning("lost the lease on %s / %s to another worker", *lost)
            self.hub.forget(*lost)
        self.held = held

    def _claim(self, stream: str, model: str) -> bool:
        """Take a free stream (or one whose owner's lease ran out): its detectors are rebuilt
        from the snapshot and the log on first use."""
        if not self._watches(model):
            return False
        cursor = self.store.claim_detection_stream(
            stream, model, self.token, lease_seconds=self.lease_seconds
        )
        if cursor is None:
            return False  # another worker's
        self.hub.forget(stream, model)
        self.held.add((stream, model))
        logger.info("took %s / %s at entry %d", stream, model, cursor)
        return True

    def _discover(self) -> None:
        """Note the streams that got queries since the last pass (an incremental scan). On
        PostgreSQL, replicas commit entries out of id order (an id is drawn before its commit),
        so the scan starts DISCOVERY_LOOKBACK ids back: an entry that committed after a higher
        one was scanned is still found, not left until its client's next request."""
        after = max(0, self._seen_through - DISCOVERY_LOOKBACK)
        for stream, model, last in self.store.detection_streams(
            self.settings.detection_groups, after=after
        ):
            key = (stream, model)
            self._last_entry[key] = max(self._last_entry.get(key, 0), last)
            self._seen_through = max(self._seen_through, last)

    def _advance(self, stream: str, model: str) -> bool:
        """Feed one held stream up to the log's end and commit its cursor with its alarms."""
        self._pending = []
        try:
            through = self.hub.advance(stream, model)
        except LeaseLost:
            self.hub.forget(stream, model)  # part-fed: its new owner rebuilds it
            return False
        if not self.store.advance_detection_stream(
            stream, model, self.token, through_entry=through, alarms=self._pending
        ):
            logger.warning("lost %s / %s before committing: its new owner redoes it", stream, model)
            self.held.discard((stream, model))
            self.hub.forget(stream, model)
            return False
        self.hub.save_snapshot(
            stream, model, due_only=True
        )  # after the commit: never ahead of the cursor
        return True

    def _watches(self, model: str) -> bool:
        """Whether ``model`` has detectors; a client's trained model is loaded on first sight."""
        if model not in self.hub.configs and model.startswith("u/"):
            job = self.store.hosted_job(model)
            if job is not None:
                self.hub.add_model(model, load_user_model(job, self.settings.state_dir).defence)
        return self.hub.watches(model)

    # -- hooks of the hub ------------------------------------------------------------------------
    def _read_log(
        self, stream: str, model: str, after: int
    ) -> Iterator[tuple[int, np.ndarray, list[int]]]:
        if stream == ALL_CLIENTS:
            rows = self.store.detection_log(model, after=after)
        elif stream.startswith(GROUP_PREFIX):
            rows = self.store.detection_log(model, after=after, org=stream[len(GROUP_PREFIX) :])
        else:
            rows = self.store.detection_log(model, after=after, client_id=stream)
        for entry_id, client_id, images, labels in rows:
            if time.monotonic() - self._renewed > self.lease_seconds / 3:
                self._renew()
                if (stream, model) not in self.held:
                    raise LeaseLost(f"{stream} / {model}")
            self._reading_client = client_id
            yield entry_id, images, labels

    def _on_alarm(
        self, stream: str, model: str, detector: str, query_index: int, verdict: Verdict
    ) -> None:
        self._pending.append(
            {
                "detector": detector,
                "query_index": query_index,
                "client_id": self._reading_client,
                "statistic": verdict.statistic,
                "threshold": verdict.threshold,
            }
        )

    # -- the process -----------------------------------------------------------------------------
    def run(self, stop: threading.Event, *, poll: float) -> None:
        """Pass after pass until ``stop`` is set (waiting ``poll`` s when nothing moved)."""
        logger.info("detection worker %s watching %s", self.token[:8], sorted(self.hub.configs))
        try:
            while not stop.is_set():
                if not self.step():
                    stop.wait(poll)
        finally:
            self.close()

    def close(self) -> None:
        """Snapshot the streams held (their cursors are committed) and free them."""
        for stream, model in sorted(self.held):
            try:
                self.hub.save_snapshot(stream, model, due_only=False)
            except Exception:
                logger.exception("snapshot of %s / %s failed", stream, model)
        self.store.release_detection_leases(self.token)
        self.held.clear()


def hosted_models(settings: Settings) -> dict[str, HostedModel]:
    """Every operator model with its detectors, as ``serve`` builds them (checkpoints must
    exist: a worker never trains)."""
    return {
        name: load_hosted(
            name,
            settings.checkpoint_dir,
            train_missing=False,
            data_root=settings.data_root,
            detectors=settings.detectors.get(name),
            alarm_policy=settings.alarm_policies.get(name, "log"),
        )
        for name in settings.models
    }


def hosted_defences(settings: Settings) -> dict[str, DefenceConfig]:
    return {name: hosted.defence for name, hosted in hosted_models(settings).items()}


def run_detection_worker(settings: Settings, *, poll: float) -> None:
    """The ``target-service detect`` process: run until SIGTERM or SIGINT."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %d: stopping after this pass", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    import scipy.stats  # noqa: F401  PRADA imports it at its first test: paid here, not in a lag

    store = open_store(settings)
    try:
        models = hosted_models(settings)
        worker = DetectionWorker(
            settings, store, {name: hosted.defence for name, hosted in models.items()}
        )
        for name, hosted in models.items():
            worker.hub.warm_up(name, hosted.input_shape)
        worker.run(stop, poll=poll)
    finally:
        store.close()
