"""The training job state machine and queue, on the state store itself (no HTTP, no training).

Each transition is a conditional UPDATE: these tests drive a job through every edge of the
machine in ``training_jobs.py`` and check that every other move is refused, that a worker
whose lease ran out can no longer write (no two runs of one job count), and that quotas are
reserved at submission and refunded for epochs that did not run.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from target_service.errors import Conflict, QuotaExceeded
from target_service.state import StateStore, store_at
from target_service.training_jobs import FINAL, TRANSITIONS, sources


@pytest.fixture
def store(state_address: str) -> Iterator[StateStore]:
    store = store_at(state_address)  # SQLite and PostgreSQL
    yield store
    store.close()


def client_with_dataset(store: StateStore, quota: int = 1000) -> tuple[str, str]:
    client, _ = store.create_client(f"c{uuid.uuid4().hex[:6]}", 10, training_quota=quota)
    dataset_id = uuid.uuid4().hex[:16]
    store.add_dataset(
        {
            "dataset_id": dataset_id,
            "client_id": client.client_id,
            "name": "d",
            "n": 50,
            "shape": [1, 28, 28],
            "dtype": "uint8",
            "classes": 10,
            "sha256": "0" * 64,
            "bytes": 1,
            "created_at": time.time(),
        }
    )
    return client.client_id, dataset_id


def submit(store: StateStore, client_id: str, dataset_id: str, *, epochs: int = 4) -> str:
    job_id = uuid.uuid4().hex[:16]
    store.submit_job(
        {
            "job_id": job_id,
            "client_id": client_id,
            "dataset_id": dataset_id,
            "spec": {"request": {}},
            "model": f"u/x/{job_id}",
            "publish": "private",
            "epochs": epochs,
            "train_images": 50,
        },
        test_dataset_id=None,
    )
    return job_id


def test_transition_table() -> None:
    assert {"succeeded", "failed", "cancelled"} == FINAL
    assert sources("running") == ("queued", "running")  # a claim, or a takeover after a lease
    assert sources("cancelled") == ("queued", "running")
    assert sources("succeeded") == sources("failed") == sources("queued") == ("running",)
    assert all(not TRANSITIONS[status] for status in FINAL)


def test_claim_run_succeed(store: StateStore) -> None:
    client_id, dataset_id = client_with_dataset(store)
    job_id = submit(store, client_id, dataset_id)
    assert store.get_job(job_id)["status"] == "queued"
    job = store.claim_job("w1", lease_seconds=60)
    assert job is not None and job["job_id"] == job_id
    assert (job["status"], job["attempts"], job["claim_token"]) == ("running", 1, "w1")
    assert store.claim_job("w2", lease_seconds=60) is None  # a held job is nobody else's
    assert store.record_epoch(job_id, "w1", epoch=1, loss=1.5, train_accuracy=0.5)
    assert not store.record_epoch(job_id, "w2", epoch=2, loss=1.0, train_accuracy=0.6)
    assert store.finish_job(job_id, "w1", status="succeeded", metrics={"train_accuracy": 0.9})
    done = store.get_job(job_id)
    assert (done["status"], done["epoch"], done["metrics"]) == (
        "succeeded",
        1,
        {"train_accuracy": 0.9},
    )
    assert store.hosted_job(done["model"])["job_id"] == job_id
    with pytest.raises(Conflict, match="already succeeded"):
        store.cancel_job(job_id)
    assert not store.finish_job(job_id, "w1", status="failed")  # final is final


def test_expired_lease_is_taken_over_and_the_old_worker_cannot_write(store: StateStore) -> None:
    client_id, dataset_id = client_with_dataset(store)
    job_id = submit(store, client_id, dataset_id)
    # a lease long enough for two more statements on a loaded machine, on either database
    assert store.claim_job("dead", lease_seconds=1.0) is not None
    assert store.record_epoch(job_id, "dead", epoch=1, loss=2.0, train_accuracy=0.1)
    assert store.claim_job("alive", lease_seconds=60) is None  # lease still valid
    time.sleep(1.1)
    taken = store.claim_job("alive", lease_seconds=60)
    assert taken is not None and (taken["attempts"], taken["epoch"]) == (2, 1)
    assert not store.renew_lease(job_id, "dead", lease_seconds=60)
    assert not store.record_epoch(job_id, "dead", epoch=2, loss=1.0, train_accuracy=0.2)
    assert not store.finish_job(job_id, "dead", status="succeeded")
    assert store.record_epoch(job_id, "alive", epoch=2, loss=1.0, train_accuracy=0.3)
    assert [(e["epoch"], e["attempt"]) for e in store.epoch_log(job_id)] == [(1, 1), (2, 2)]


def test_release_requeues_and_cancel_refunds_the_epochs_not_run(store: StateStore) -> None:
    client_id, dataset_id = client_with_dataset(store, quota=400)
    job_id = submit(store, client_id, dataset_id, epochs=4)
    assert store.training_usage(client_id) == (400, 200)
    store.claim_job("w1", lease_seconds=60)
    store.record_epoch(job_id, "w1", epoch=1, loss=1.0, train_accuracy=0.5)
    assert store.finish_job(job_id, "w1", status="queued")  # a stopped worker gives it back
    assert store.get_job(job_id)["status"] == "queued"
    assert store.claim_job("w2", lease_seconds=60)["attempts"] == 2
    cancelled = store.cancel_job(job_id, client_id)
    assert cancelled["status"] == "cancelled" and cancelled["claim_token"] is None
    assert not store.record_epoch(job_id, "w2", epoch=2, loss=1.0, train_accuracy=0.5)
    assert store.training_usage(client_id) == (400, 50)  # 3 of 4 epochs refunded
    assert [(e["image_epochs"], e["reason"]) for e in store.training_ledger(client_id)] == [
        (200, "reserved"),
        (-150, "cancelled"),
    ]
    assert store.claim_job("w3", lease_seconds=60) is None


def test_failed_job_refunds_and_quota_refusal_creates_nothing(store: StateStore) -> None:
    client_id, dataset_id = client_with_dataset(store, quota=300)
    job_id = submit(store, client_id, dataset_id, epochs=4)
    with pytest.raises(QuotaExceeded, match="needs 200 image-epochs"):
        submit(store, client_id, dataset_id, epochs=4)
    assert [job["job_id"] for job in store.list_jobs(client_id)] == [job_id]
    store.claim_job("w", lease_seconds=60)
    store.record_epoch(job_id, "w", epoch=2, loss=1.0, train_accuracy=0.5)
    assert store.finish_job(job_id, "w", status="failed", error="boom")
    assert store.get_job(job_id)["error"] == "boom"
    assert store.training_usage(client_id) == (300, 100)
    with pytest.raises(ValueError, match="status must be"):
        store.finish_job(job_id, "w", status="cancelled")
