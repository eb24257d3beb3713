"""A real ``target-service serve`` on a real PostgreSQL that fails: down at start (a clear
error, exit 1, the password masked), and restarted under load (503 ``state_unavailable`` while
it is down, nothing charged twice, the same service process answers again afterwards)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import numpy as np
import psycopg
import pytest

from mlcore.wire import encode_tensor
from target_service.postgres_server import PostgresServer, temporary_postgres
from target_service.testing import LiveServer, admin_create_client, free_port, target_env

pytestmark = pytest.mark.e2e

PREDICT = "/v1/models/lenet5-mnist/predict"


def test_serve_with_the_database_down_exits_naming_it_without_its_password() -> None:
    url = f"postgresql://alice:s3cret-pw@127.0.0.1:{free_port()}/range"  # nothing listens there
    result = subprocess.run(
        [sys.executable, "-m", "target_service.cli", "serve", "--port", str(free_port())],
        env=target_env({"database_url": url, "train_missing": False}),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"postgresql://alice:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in result.stderr
    assert "Connection refused" in result.stderr
    assert "s3cret-pw" not in output


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own: it is stopped and started under load."""
    with temporary_postgres(durable=False) as server:
        yield server


def test_a_database_restart_under_load_fails_requests_with_503_and_charges_nothing_twice(
    live_server_factory: Callable[..., LiveServer], own_postgres: PostgresServer
) -> None:
    server = live_server_factory(database_url=own_postgres.url)
    client_id, key = admin_create_client(server, "steady", budget=10_000)
    images_each = 2
    x = np.random.default_rng(0).integers(0, 256, size=(images_each, 1, 28, 28), dtype=np.uint8)
    inputs = encode_tensor(x).model_dump()
    statuses: list[tuple[int, str | None]] = []  # every attempt: status, error code
    answers: dict[str, dict] = {}
    answered, restarted = threading.Event(), threading.Event()

    def send() -> None:
        """Like the attacker's oracle: retry a 5xx or a dropped connection with the same
        request_id until it is answered; go on until 10 answers after the restart."""
        with server.client(timeout=30.0, headers={"Authorization": f"Bearer {key}"}) as http:
            after_restart = 0
            for index in range(4000):
                if after_restart == 10:
                    return
                request_id = f"r{index}"
                while request_id not in answers:
                    try:
                        response = http.post(
                            PREDICT, json={"inputs": inputs, "request_id": request_id}
                        )
                    except httpx2.TransportError:
                        statuses.append((0, None))
                        time.sleep(0.05)
                        continue
                    code = response.json()["error"]["code"] if response.status_code >= 400 else None
                    statuses.append((response.status_code, code))
                    if response.status_code == 200:
                        answers[request_id] = response.json()
                    else:
                        assert response.status_code == 503, response.text
                        time.sleep(0.05)
                if index == 10:
                    answered.set()
                after_restart += restarted.is_set()

    sender = threading.Thread(target=send)
    sender.start()
    assert answered.wait(timeout=120), "the service answered too few requests before the restart"
    own_postgres.stop()
    # The database stays down until a request has met it (the pool waits up to its timeout
    # for a connection, so a short outage can pass unseen): then it comes back.
    deadline = time.monotonic() + 60
    while not any(status == 503 for status, _ in statuses) and time.monotonic() < deadline:
        time.sleep(0.1)
    own_postgres.start()
    restarted.set()
    sender.join(timeout=300)
    assert not sender.is_alive()

    unavailable = [status for status in statuses if status[0] == 503]
    assert unavailable, "no request met the database down"
    assert all(code == "state_unavailable" for _, code in unavailable)
    requests = len(answers)
    assert server.running and server.starts == 1, "the service recovered without a restart"
    with psycopg.connect(own_postgres.url) as db:
        ledger = db.execute(
            "SELECT request_id, images FROM ledger WHERE client_id = %s", (client_id,)
        ).fetchall()
        used = db.execute("SELECT used FROM clients WHERE client_id = %s", (client_id,)).fetchone()
    assert sorted(request_id for request_id, _ in ledger) == sorted(answers), "each charged once"
    assert used == (requests * images_each,)
    assert max(answer["queries_used"] for answer in answers.values()) == used[0]


def test_serve_keeps_no_sqlite_file_when_the_state_is_in_postgresql(
    live_server_factory: Callable[..., LiveServer], postgres_server: PostgresServer
) -> None:
    url = postgres_server.create_database("serve_no_sqlite")
    server = live_server_factory(database_url=url)
    client_id, _ = admin_create_client(server, "pg-only", budget=5)
    with psycopg.connect(url) as db:
        row = db.execute("SELECT budget FROM clients WHERE client_id = %s", (client_id,)).fetchone()
    assert row == (5,)
    assert not Path(server.state_path).exists()
