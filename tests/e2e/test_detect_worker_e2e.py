"""Real ``target-service detect`` processes on one state database (issue 14, item 3): a worker
killed with SIGKILL mid-stream is replaced by another that resumes from the stream's cursor
with no query skipped or seen twice, and two workers running at once never observe one stream
at the same time.

The queries are charged straight into the store (what a predict request writes); the workers
run a ``digest`` detector (tests/target_service/worker_detectors.py) whose state is a hash chain
over every query it saw, in order, beside PRADA.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from defenses.base import DETECTORS, make_detector
from target_service.snapshots import read_snapshot
from target_service.state import SQLiteStore, StateStore
from tests.e2e.test_detection_e2e import synthetic_steps
from tests.target_service.worker_detectors import KIND, REGISTRATION

pytestmark = pytest.mark.e2e

MODEL = "lenet5-mnist"
ROOT = Path(__file__).resolve().parents[2]
LEASE_SECONDS = 2.0


@pytest.fixture(autouse=True)
def digest_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DETECTORS, KIND, REGISTRATION)


class Workers:
    """Starts ``target-service detect`` processes on one state folder; kills them at the end."""

    def __init__(self, root: Path, checkpoints: Path, detectors: dict[str, Any]) -> None:
        self.root, self.processes = root, list[subprocess.Popen[bytes]]()
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
            "TARGET_STATE_DIR": str(root / "state"),
            "TARGET_CHECKPOINT_DIR": str(checkpoints),
            "TARGET_MODELS": json.dumps([MODEL]),
            "TARGET_TRAIN_MISSING": "false",
            "TARGET_DETECTORS": json.dumps({MODEL: detectors}),
            "TARGET_DETECTION_MODE": "worker",
            "TARGET_DETECTION_LEASE_SECONDS": str(LEASE_SECONDS),
            "TARGET_SNAPSHOT_EVERY": "40",
        }

    def start(self) -> subprocess.Popen[bytes]:
        log = open(self.root / f"worker{len(self.processes)}.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.target_service.worker_detectors", "detect",
             "--poll", "0.05"],
            env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.processes.append(process)
        return process

    def wait_watching(self, count: int, timeout: float = 120.0) -> None:
        """Until ``count`` workers have started their loop (logged it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            logs = [(self.root / f"worker{i}.log").read_text() for i in range(count)]
            if all("watching" in log for log in logs):
                return
            for process in self.processes:
                assert process.poll() is None, self.logs()
            time.sleep(0.1)
        raise AssertionError(f"workers did not start:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(path.read_text()[-3000:] for path in sorted(self.root.glob("*.log")))

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def workers_factory(
    tmp_path: Path, trained_checkpoints: Path
) -> Iterator[Callable[[dict[str, Any]], Workers]]:
    made: list[Workers] = []

    def make(detectors: dict[str, Any]) -> Workers:
        made.append(Workers(tmp_path, trained_checkpoints, detectors))
        return made[-1]

    yield make
    for workers in made:
        workers.close()


def charge(store: StateStore, client_id: str, x: np.ndarray, labels: list[int]) -> int:
    """What a predict request on a watched model writes: the charge and its query-log row."""
    done = store.charge(
        client_id, model=MODEL, images=len(x), request_id=None, fingerprint="-",
        response={"labels": labels}, observation=x, observed_labels=labels,
    )  # fmt: skip
    assert done.entry_id is not None
    return done.entry_id


def cursor(store: StateStore, stream: str) -> int:
    rows = [r for r in store.detection_leases() if (r["stream"], r["model"]) == (stream, MODEL)]
    return rows[0]["through_entry"] if rows else 0


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def reference(batches: list[np.ndarray], labels: list[list[int]]) -> dict[str, Any]:
    """The digest and PRADA's first alarm of one uninterrupted pass over the stream."""
    digest, prada = make_detector(KIND), make_detector("prada", delta=0.95)
    for x, y in zip(batches, labels, strict=True):
        for detector in (digest, prada):
            detector.observe(torch.from_numpy(x), torch.as_tensor(y))
    return {"digest": digest.state_dict()["digest"], "prada": prada.first_alarm_at}


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


def test_a_worker_killed_mid_stream_is_resumed_with_no_query_skipped_or_seen_twice(
    tmp_path: Path, workers_factory: Callable[[dict[str, Any]], Workers]
) -> None:
    workers = workers_factory({KIND: {"delay": 0.01}, "prada": {"delta": 0.95}})
    store = SQLiteStore(tmp_path / "state" / "state.sqlite3")
    client, _ = store.create_client("jbda", 10_000)
    batches = synthetic_steps(60, size=10)
    labels = [[int(v) for v in np.random.default_rng(i).integers(0, 10, 10)] for i in range(60)]
    first = workers.start()
    workers.wait_watching(1)
    entries = [charge(store, client.client_id, batches[i], labels[i]) for i in range(20)]
    wait_for(lambda: cursor(store, client.client_id) >= entries[10], "the first worker")
    for i in range(20, 40):
        entries.append(charge(store, client.client_id, batches[i], labels[i]))
        time.sleep(0.02)
    first.kill()  # SIGKILL: no snapshot, no release; its lease must run out
    first.wait()
    killed_at = cursor(store, client.client_id)
    entries += [charge(store, client.client_id, batches[i], labels[i]) for i in range(40, 60)]
    second = workers.start()
    wait_for(lambda: cursor(store, client.client_id) == entries[-1], "the second worker")
    stop(second)  # snapshots the stream it holds, then frees it

    assert entries[10] <= killed_at < entries[-1], workers.logs()
    assert "took" in (tmp_path / "worker1.log").read_text()
    snapshot = read_snapshot(tmp_path / "state" / "detectors" / client.client_id / f"{MODEL}.npz")
    assert snapshot["through_entry"] == entries[-1]
    expected = reference(batches, labels)
    assert snapshot["detectors"][KIND]["queries_seen"] == 600
    assert snapshot["detectors"][KIND]["digest"] == expected["digest"]  # each query once, in order
    assert expected["prada"] is not None
    assert [(a["detector"], a["query_index"]) for a in store.list_alarms()] == [
        ("prada", expected["prada"])
    ]
    assert [r["owner"] for r in store.detection_leases()] == [None]
    store.close()


def test_two_workers_never_observe_one_stream_at_once(
    tmp_path: Path, workers_factory: Callable[[dict[str, Any]], Workers]
) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    workers = workers_factory({KIND: {"delay": 0.01, "busy_dir": str(busy)}})
    store = SQLiteStore(tmp_path / "state" / "state.sqlite3")
    clients = [store.create_client(f"c{i}", 10_000)[0].client_id for i in range(6)]
    processes = [workers.start(), workers.start()]
    workers.wait_watching(2)
    rng = np.random.default_rng(0)
    sent: dict[str, list[np.ndarray]] = {c: [] for c in clients}
    owners: set[str] = set()
    last: dict[str, int] = {}
    for _ in range(25):
        for tag, client_id in enumerate(clients, start=1):
            x = rng.integers(0, 256, size=(5, 1, 28, 28), dtype=np.uint8)
            x[:, 0, 0, 0] = tag  # the digest detector names the stream it marks busy by this
            last[client_id] = charge(store, client_id, x, [0] * 5)
            sent[client_id].append(x)
        owners |= {r["owner"] for r in store.detection_leases() if r["owner"]}
        time.sleep(0.05)
    for client_id in clients:
        wait_for(lambda c=client_id: cursor(store, c) == last[c], f"stream {client_id}")
    for process in processes:
        stop(process)

    assert sorted(path.name for path in busy.iterdir()) == []  # no overlap-*, no busy-* left
    assert len(owners) == 2, "both workers should have held streams"
    for client_id in clients:
        path = tmp_path / "state" / "detectors" / client_id / f"{MODEL}.npz"
        state = read_snapshot(path)["detectors"][KIND]
        assert state["queries_seen"] == 125
        assert state["digest"] == reference(sent[client_id], [[0] * 5] * 25)["digest"]
    store.close()
