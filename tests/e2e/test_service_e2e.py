"""A real ``target-service serve`` process over real HTTP: budgets are exact under concurrency,
retries are charged once, a ``kill -9`` mid-load loses nothing that was charged, and labels are
the hosted model's own predictions, in order."""

from __future__ import annotations

import signal
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pytest
import torch

from mlcore.checkpoints import load_checkpoint
from mlcore.datasets import load_dataset
from mlcore.training import predict_labels
from mlcore.wire import encode_tensor
from target_service.testing import LiveServer, admin_create_client

pytestmark = pytest.mark.e2e

MODEL = "lenet5-mnist"
PREDICT = f"/v1/models/{MODEL}/predict"


@pytest.fixture(scope="module")
def server(module_server_factory: Callable[..., LiveServer]) -> LiveServer:
    return module_server_factory()


# -- helpers ------------------------------------------------------------------------------------
def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 1, 28, 28), dtype=np.uint8)


def body(x: np.ndarray, request_id: str | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"inputs": encode_tensor(x).model_dump()}
    if request_id is not None:
        payload["request_id"] = request_id
    return payload


def predict(
    http: httpx2.Client, key: str, x: np.ndarray, request_id: str | None = None
) -> httpx2.Response:
    response = http.post(
        PREDICT, json=body(x, request_id), headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code < 500, response.text
    return response


def admin_view(server: LiveServer, client_id: str) -> dict[str, Any]:
    response = httpx2.get(
        f"{server.url}/v1/admin/clients/{client_id}", headers=server.admin_headers, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()


def ledger(server: LiveServer, client_id: str) -> list[tuple[str | None, int]]:
    """The server's ledger rows of one client, read from its SQLite file."""
    with sqlite3.connect(server.state_path, timeout=30) as db:
        return db.execute(
            "SELECT request_id, images FROM ledger WHERE client_id = ? ORDER BY entry_id",
            (client_id,),
        ).fetchall()


def assert_refused(response: httpx2.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json() == {
        "error": {"code": code, "message": response.json()["error"]["message"]}
    }


# -- budgets ------------------------------------------------------------------------------------
def test_budget_runs_out_exactly(server: LiveServer) -> None:
    client_id, key = admin_create_client(server, "exact", 10)
    with server.client() as http:
        first = predict(http, key, images(4, 1))
        second = predict(http, key, images(4, 2))
        assert (first.status_code, second.status_code) == (200, 200)
        assert (second.json()["queries_used"], second.json()["queries_remaining"]) == (8, 2)

        too_big = predict(http, key, images(3, 3))  # would end at 11: refused whole
        assert_refused(too_big, 402, "budget_exhausted")
        assert "3 image(s)" in too_big.json()["error"]["message"]
        assert admin_view(server, client_id)["queries_used"] == 8

        fits = predict(http, key, images(2, 4))  # ends at exactly 10: answered
        assert fits.status_code == 200
        assert len(fits.json()["labels"]) == 2
        assert (fits.json()["queries_used"], fits.json()["queries_remaining"]) == (10, 0)

        for n in (1, 1, 3, 1):
            assert_refused(predict(http, key, images(n, 5)), 402, "budget_exhausted")
    view = admin_view(server, client_id)
    assert (view["queries_used"], view["queries_remaining"]) == (10, 0)
    assert ledger(server, client_id) == [(None, 4), (None, 4), (None, 2)]


def test_sixteen_concurrent_clients_never_overspend_one_budget(server: LiveServer) -> None:
    budget, threads = 300, 16
    client_id, key = admin_create_client(server, "crowd", budget)
    answered: list[tuple[int, int]] = []  # (images, queries_used reported)
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker(index: int) -> None:
        step = 0
        with server.client() as http:
            start.wait()
            while True:
                size = 1 + (index + step) % 5
                response = predict(http, key, images(size, 1000 * index + step))
                step += 1
                with lock:
                    statuses.append(response.status_code)
                if response.status_code == 200:
                    with lock:
                        answered.append((size, response.json()["queries_used"]))
                    assert len(response.json()["labels"]) == size
                elif size == 1:  # even one image does not fit: the budget is spent
                    return

    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            worker(index)
        except BaseException as exc:  # surfaced below, with the thread's assertion
            errors.append(exc)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=150)
    assert not any(thread.is_alive() for thread in pool)
    assert not errors, errors[0]

    assert set(statuses) == {200, 402}
    assert sum(size for size, _ in answered) == budget
    reported = [used for _, used in answered]
    assert len(set(reported)) == len(reported) and max(reported) == budget
    view = admin_view(server, client_id)
    assert (view["queries_used"], view["queries_remaining"]) == (budget, 0)
    rows = ledger(server, client_id)
    assert len(rows) == len(answered)
    assert sum(images for _, images in rows) == budget


# -- idempotent retries -------------------------------------------------------------------------
def test_a_retried_request_id_is_charged_once(server: LiveServer) -> None:
    client_id, key = admin_create_client(server, "retrier", 12)
    x = images(5, 7)
    with server.client() as http:
        first = predict(http, key, x, request_id="batch-1")
        retries = [predict(http, key, x, request_id="batch-1") for _ in range(3)]
        assert first.status_code == 200 and first.json()["charged"] == 5
        replayed = {**first.json(), "charged": 0}  # the same answer, nothing charged for it
        assert all(r.status_code == 200 and r.json() == replayed for r in retries)
        assert admin_view(server, client_id)["queries_used"] == 5

        reused = predict(http, key, images(5, 8), request_id="batch-1")
        assert_refused(reused, 409, "request_id_reused")
        assert "'batch-1'" in reused.json()["error"]["message"]
        assert admin_view(server, client_id)["queries_used"] == 5

        # spend the rest: a retry of the charged request still gets its stored answer
        rest = predict(http, key, images(7, 9), request_id="batch-2")
        assert rest.json()["queries_remaining"] == 0
        late_retry = predict(http, key, x, request_id="batch-1")
        assert late_retry.status_code == 200 and late_retry.json() == replayed
        broke = predict(http, key, images(1, 10), request_id="batch-3")
        assert_refused(broke, 402, "budget_exhausted")
    assert admin_view(server, client_id)["queries_used"] == 12
    assert ledger(server, client_id) == [("batch-1", 5), ("batch-2", 7)]


def test_concurrent_duplicates_of_a_request_id_are_charged_once(server: LiveServer) -> None:
    client_id, key = admin_create_client(server, "duplicates", 100)
    x = images(6, 11)
    start = threading.Barrier(8)
    results: list[httpx2.Response] = []

    def send() -> None:
        with server.client() as http:
            start.wait()
            results.append(predict(http, key, x, request_id="same-request"))

    pool = [threading.Thread(target=send) for _ in range(8)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=120)
    assert len(results) == 8
    answers = [r.json() for r in results]
    assert all(r.status_code == 200 for r in results)
    assert sorted(answer["charged"] for answer in answers) == [0] * 7 + [6]  # one charge
    assert all({**a, "charged": 0} == {**answers[0], "charged": 0} for a in answers)
    assert admin_view(server, client_id)["queries_used"] == 6
    assert ledger(server, client_id) == [("same-request", 6)]


# -- labels ----------------------------------------------------------------------------------------
def test_labels_of_a_mixed_batch_are_the_models_in_order(
    server: LiveServer, trained_checkpoints: Path
) -> None:
    test = load_dataset("mnist-embedded:test")
    order = np.random.default_rng(0).permutation(len(test))[:120]
    x, truth = test.images[order], test.labels[order]
    local = predict_labels(load_checkpoint(trained_checkpoints / f"{MODEL}.pt").model, x)
    assert len(set(local.tolist())) >= 8, "the batch must mix predictions"

    _, key = admin_create_client(server, "labels", 1000)
    with server.client() as http:
        forward = predict(http, key, x.numpy())
        backward = predict(http, key, x.flip(0).numpy())
        as_float = predict(http, key, (x.float() / 255).numpy())
    assert forward.status_code == backward.status_code == as_float.status_code == 200
    labels = forward.json()["labels"]
    assert labels == local.tolist()
    assert backward.json()["labels"] == labels[::-1]
    assert as_float.json()["labels"] == labels
    # the hosted model is the trained classifier (0.80 test accuracy; 0.78 on these 120 images)
    assert (torch.tensor(labels) == truth).float().mean() >= 0.7


# -- crash safety -------------------------------------------------------------------------------
@dataclass
class Worker:
    """One load-generating thread: sends requests until the server dies, then retries the
    request in flight (same request_id, same inputs) after the restart."""

    server: LiveServer
    key: str
    seed: int
    answered: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    pending: tuple[str, np.ndarray] | None = None
    failed: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def run(self, restarted: threading.Event) -> None:
        try:
            with self.server.client(timeout=30) as http:
                step = 0
                while True:
                    request_id = f"w{self.seed}-{step}-{uuid.uuid4().hex[:6]}"
                    x = images(1 + step % 4, self.seed * 10_000 + step)
                    try:
                        response = predict(http, self.key, x, request_id)
                    except httpx2.TransportError:
                        self.pending = (request_id, x)
                        break
                    assert response.status_code == 200, response.text
                    self.answered[request_id] = (len(x), response.json())
                    step += 1
            self.failed.set()
            assert restarted.wait(timeout=180), "the server was not restarted"
            request_id, x = self.pending
            for attempt in range(10):
                with self.server.client(timeout=30) as http:
                    try:
                        response = predict(http, self.key, x, request_id)
                    except httpx2.TransportError:
                        time.sleep(0.5 * (attempt + 1))
                        continue
                assert response.status_code == 200, response.text
                self.answered[request_id] = (len(x), response.json())
                return
            raise AssertionError(f"retry of {request_id} never got through")
        except BaseException as exc:
            self.error = exc
            self.failed.set()


def test_kill_9_under_load_loses_nothing_charged(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory()
    clients = {name: admin_create_client(server, name, 10**6) for name in ("ann", "ben", "cat")}
    spent_id, spent_key = admin_create_client(server, "spent", 5)
    revoked_id, _ = admin_create_client(server, "gone", 50)
    with server.client() as http:
        assert predict(http, spent_key, images(5, 1)).status_code == 200
        ann_id, ann_key = clients["ann"]
        settled = predict(http, ann_key, images(3, 99), request_id="before-crash")
        assert settled.status_code == 200
        revoke = http.delete(f"/v1/admin/clients/{revoked_id}", headers=server.admin_headers)
        assert revoke.status_code == 200
        before = http.get("/v1/admin/clients", headers=server.admin_headers).json()

    workers = [
        Worker(server, key, seed=seed)
        for seed, (_, key) in enumerate(list(clients.values()) * 3)  # 3 threads per client
    ]
    restarted = threading.Event()
    threads = [threading.Thread(target=w.run, args=(restarted,)) for w in workers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 90
    while sum(len(w.answered) for w in workers) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.kill(signal.SIGKILL) == -signal.SIGKILL
    for worker in workers:
        assert worker.failed.wait(timeout=60)
    assert all(w.error is None for w in workers), next(w.error for w in workers if w.error)
    answered_before_kill = sum(len(w.answered) for w in workers)
    assert answered_before_kill >= 60

    server.restart()
    restarted.set()
    for thread in threads:
        thread.join(timeout=180)
    assert not any(thread.is_alive() for thread in threads)
    assert all(w.error is None for w in workers), next(w.error for w in workers if w.error)

    with server.client() as http:
        after = http.get("/v1/admin/clients", headers=server.admin_headers).json()
        assert_refused(predict(http, spent_key, images(1, 2)), 402, "budget_exhausted")
        # an answer charged before the crash comes back from disk, not charged again
        replayed = predict(http, ann_key, images(3, 99), request_id="before-crash")
        assert replayed.status_code == 200
        assert replayed.json() == {**settled.json(), "charged": 0}
    # every client, budget and revocation survived; only the loaded clients' usage moved
    stable = ("client_id", "name", "budget", "revoked", "created_at")
    assert [{k: c[k] for k in stable} for c in after] == [{k: c[k] for k in stable} for c in before]
    by_id = {c["client_id"]: c for c in after}
    assert by_id[spent_id]["queries_used"] == 5 and by_id[revoked_id]["revoked"]
    assert ledger(server, spent_id) == [(None, 5)]

    for client_id, key in clients.values():
        answered = {
            request_id: entry
            for w in workers
            if w.key == key
            for request_id, entry in w.answered.items()
        }
        if client_id == ann_id:
            answered["before-crash"] = (3, settled.json())
        charged = sum(images for images, _ in answered.values())
        rows = ledger(server, client_id)
        assert by_id[client_id]["queries_used"] == charged
        assert dict(rows) == {rid: images for rid, (images, _) in answered.items()}
        assert len(rows) == len(answered), "no request_id charged twice"
        reported = sorted(response["queries_used"] for _, response in answered.values())
        assert len(set(reported)) == len(reported) and reported[-1] == charged


# -- rate limit ------------------------------------------------------------------------------------
def test_rate_limit_refuses_with_429_and_charges_nothing(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory(rate_limit=0.05, rate_burst=3)
    client_id, key = admin_create_client(server, "eager", 100)
    _, other_key = admin_create_client(server, "patient", 100)
    with server.client() as http:
        assert [predict(http, key, images(2, i)).status_code for i in range(3)] == [200] * 3
        limited = predict(http, key, images(2, 3))
        assert_refused(limited, 429, "rate_limited")
        assert "requests/s" in limited.json()["error"]["message"]
        assert predict(http, other_key, images(1, 4)).status_code == 200  # per client
    assert admin_view(server, client_id)["queries_used"] == 6


# -- slow clients and file permissions ------------------------------------------------------------
def test_a_body_that_stalls_gets_408_and_the_connection_is_closed(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory(body_timeout=1.0)
    _, key = admin_create_client(server, "slowloris", budget=10)
    head = (
        f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
    )
    with socket.create_connection((server.host, server.port), timeout=20) as sock:
        started = time.monotonic()
        sock.sendall(head.encode() + b'{"inputs": {"dtype": "uint8", ')  # ...and nothing more
        received = b""
        while chunk := sock.recv(65536):  # the server answers, then hangs up
            received += chunk
        waited = time.monotonic() - started
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout", received
    assert b'"code":"body_timeout"' in rest
    assert 1.0 <= waited < 10.0


def test_state_database_and_snapshots_are_owner_only(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory(snapshot_every=1)
    _, key = admin_create_client(server, "private", budget=10)
    with server.client() as http:
        assert predict(http, key, images(2, seed=31)).status_code == 200
    # the WAL and SHM files exist while the server runs (a clean close removes them)
    modes = {path.name: path.stat().st_mode & 0o777 for path in server.state_dir.glob("state.*")}
    server.stop()  # writes every detector snapshot
    snapshots = [path for path in (server.state_dir / "detectors").rglob("*") if path.is_file()]
    assert snapshots, "no detector snapshot was written"
    modes.update({str(path): path.stat().st_mode & 0o777 for path in snapshots})
    assert {"state.sqlite3", "state.sqlite3-wal", "state.sqlite3-shm"} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o600)
