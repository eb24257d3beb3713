"""Replicas on PostgreSQL commit query-log entries out of id order (each id is drawn before its
transaction commits): the detection worker must still find an entry that appears after a
higher one was scanned, rather than leave it until its client's next request."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from target_service.detect_worker import DetectionWorker, hosted_defences
from target_service.settings import Settings
from target_service.state import SQLStore, open_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = "lenet5-mnist"


def log_entry(store: SQLStore, client_id: str, entry_id: int) -> None:
    """A charged 1-image request written with a chosen entry id, as a late commit leaves it."""
    image = np.zeros((1, 1, 28, 28), dtype=np.uint8)
    store._db.execute(
        "INSERT INTO ledger (entry_id, client_id, model, request_id, images, created_at)"
        " VALUES (?,?,?,?,?,?)",
        (entry_id, client_id, MODEL, None, 1, time.time()),
    )
    store._db.execute(
        "INSERT INTO query_log VALUES (?,?,?,?,?,?,?)",
        (entry_id, client_id, MODEL, "uint8", json.dumps(image.shape), image.tobytes(), "[0]"),
    )


def test_an_entry_committed_after_a_higher_one_is_still_detected(
    tmp_path: Path, trained_checkpoints: Path
) -> None:
    settings = Settings(
        state_dir=tmp_path, checkpoint_dir=trained_checkpoints, models=[MODEL],
        train_missing=False, detectors={MODEL: {"prada": {}}}, detection_mode="worker",
    )  # fmt: skip
    store = open_store(settings)
    assert isinstance(store, SQLStore)
    try:
        early, _ = store.create_client("early", 10)
        late, _ = store.create_client("late", 10)
        log_entry(store, early.client_id, 2)
        worker = DetectionWorker(settings, store, hosted_defences(settings))
        while worker.step():  # sees entry 2
            pass
        log_entry(store, late.client_id, 1)  # drawn before entry 2, committed after it
        while worker.step():
            pass
        worker.close()
        cursors = {row["stream"]: row["through_entry"] for row in store.detection_leases()}
        assert cursors == {early.client_id: 2, late.client_id: 1}
    finally:
        store.close()
