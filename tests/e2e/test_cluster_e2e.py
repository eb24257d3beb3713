"""``target-service cluster`` for real: PostgreSQL, replicas and a detection worker in their own
processes on loopback. One budget stays exact with 64 clients spread over 4 replicas; a
request_id sent to two replicas at once is charged once; a replica SIGKILLed under load loses no
charged request (its clients retry their request_ids on the others, which go on); SIGTERM stops
every process the cluster started; ``serve --workers N`` shares one port and one budget."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pytest

from mlcore.wire import encode_tensor
from target_service.postgres_server import PostgresServer
from target_service.state import store_at
from target_service.testing import (
    DEFAULT_ADMIN_TOKEN,
    LiveServer,
    admin_create_client,
    free_port,
    target_env,
)

MODEL = "lenet5-mnist"
PREDICT = f"/v1/models/{MODEL}/predict"
ADMIN = {"Authorization": f"Bearer {DEFAULT_ADMIN_TOKEN}"}
STARTUP_SECONDS = 600.0  # four replicas importing torch at once on a shared 2-core machine


def image_body(seed: int, request_id: str | None = None) -> dict[str, Any]:
    x = np.random.default_rng(seed).integers(0, 256, (1, 1, 28, 28), dtype=np.uint8)
    body: dict[str, Any] = {"inputs": encode_tensor(x).model_dump()}
    if request_id is not None:
        body["request_id"] = request_id
    return body


class RunningCluster:
    """A ``target-service cluster`` subprocess; ``status`` is its cluster.json once ready."""

    def __init__(self, state_dir: Path, argv: list[str], env: dict[str, str]) -> None:
        self.state_dir = state_dir
        self.log_path = state_dir.parent / "cluster.out"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.status = self._wait_ready()

    def _wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + STARTUP_SECONDS
        status_path = self.state_dir / "cluster.json"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"cluster exited: {self.log_path.read_text()[-6000:]}")
            if status_path.exists():
                status: dict[str, Any] = json.loads(status_path.read_text())
                if status["ready"]:
                    return status
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"cluster not ready in time: {self.log_path.read_text()[-6000:]}")

    @property
    def urls(self) -> list[str]:
        return list(self.status["urls"])

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


def start_cluster(
    root: Path, checkpoint_dir: Path, *, replicas: int, database_url: str | None
) -> RunningCluster:
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # PostgreSQL, run as user postgres, must pass through it
    argv = [
        sys.executable, "-m", "target_service.cli", "cluster",
        "--replicas", str(replicas), "--port", str(free_port()),
        "--state-dir", str(root / "state"), "--checkpoint-dir", str(checkpoint_dir),
        "--log-level", "warning",
    ]  # fmt: skip
    if database_url is not None:
        argv += ["--database-url", database_url]
    env = target_env(
        {
            "admin_token": DEFAULT_ADMIN_TOKEN,
            "models": [MODEL],
            "train_missing": False,
            "database_pool_size": 4,
        }
    )
    return RunningCluster(root / "state", argv, env)


@pytest.fixture(scope="module")
def cluster(
    trained_checkpoints: Path, postgres_server: PostgresServer, tmp_path_factory: Any
) -> Iterator[RunningCluster]:
    """Four replicas and a detection worker on the session's PostgreSQL (a database of its own)."""
    url = postgres_server.create_database("cluster_e2e")
    running = start_cluster(
        tmp_path_factory.mktemp("cluster"), trained_checkpoints, replicas=4, database_url=url
    )
    running.status["database_url"] = url
    yield running
    running.stop()


def create_client(url: str, name: str, budget: int) -> tuple[str, str]:
    response = httpx2.post(
        f"{url}/v1/admin/clients", json={"name": name, "budget": budget}, headers=ADMIN, timeout=60
    )
    assert response.status_code == 201, response.text
    body = response.json()
    return body["client_id"], body["api_key"]


def ledger_rows(database_url: str, client_id: str) -> list[dict[str, Any]]:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(database_url, row_factory=dict_row) as connection:
        return connection.execute(
            "SELECT request_id, images FROM ledger WHERE client_id = %s", (client_id,)
        ).fetchall()


def test_64_clients_across_4_replicas_spend_one_budget_exactly(cluster: RunningCluster) -> None:
    budget = 150
    client_id, key = create_client(cluster.urls[0], "shared-budget", budget)
    used_seen: list[int] = []
    refusals: list[int] = []
    start = threading.Barrier(64)

    def client_loop(index: int) -> None:
        url = cluster.urls[index % len(cluster.urls)]
        headers = {"Authorization": f"Bearer {key}"}
        with httpx2.Client(base_url=url, headers=headers, timeout=120) as http:
            start.wait()
            for attempt in range(100):
                response = http.post(PREDICT, json=image_body(index * 1000 + attempt))
                if response.status_code == 402:
                    refusals.append(index)
                    return
                assert response.status_code == 200, response.text
                used_seen.append(response.json()["queries_used"])

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert len(refusals) == 64, "every client ends on a 402"
    assert sorted(used_seen) == list(range(1, budget + 1)), "each charge is one step of one budget"
    rows = ledger_rows(cluster.status["database_url"], client_id)
    assert sum(row["images"] for row in rows) == budget
    clients = httpx2.get(f"{cluster.urls[3]}/v1/admin/clients", headers=ADMIN, timeout=60).json()
    (record,) = [c for c in clients if c["client_id"] == client_id]
    assert record["queries_used"] == budget


def test_a_request_id_sent_to_two_replicas_at_once_is_charged_once(
    cluster: RunningCluster,
) -> None:
    client_id, key = create_client(cluster.urls[0], "twice", 100)
    headers = {"Authorization": f"Bearer {key}"}

    def send(url: str, body: dict[str, Any], start: threading.Barrier) -> httpx2.Response:
        start.wait()
        return httpx2.post(f"{url}{PREDICT}", json=body, headers=headers, timeout=120)

    for attempt in range(5):
        body = image_body(attempt, request_id=f"same-{attempt}")
        start = threading.Barrier(2)
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(send, url, body, start) for url in cluster.urls[:2]]
            answers = [future.result(timeout=120) for future in futures]
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        bodies = sorted((a.json() for a in answers), key=lambda b: b["charged"])
        assert [b["charged"] for b in bodies] == [0, 1], "one charged, one stored answer"
        assert bodies[0]["labels"] == bodies[1]["labels"]
        assert bodies[1]["queries_used"] == attempt + 1
    rows = ledger_rows(cluster.status["database_url"], client_id)
    assert sorted(row["request_id"] for row in rows) == [f"same-{i}" for i in range(5)]


def test_a_replica_killed_under_load_loses_no_charged_request(cluster: RunningCluster) -> None:
    """16 clients on all replicas, each request with its own request_id; replica 3 is SIGKILLed
    mid-load. A request whose connection broke is retried with the same request_id on the next
    replica: afterwards the ledger holds exactly the request_ids answered, once each."""
    client_id, key = create_client(cluster.urls[0], "survivor", 10**6)
    headers = {"Authorization": f"Bearer {key}"}
    answered: dict[str, int] = {}  # request_id -> charged (1: charged now, 0: a stored answer)
    by_victim: list[str] = []
    broken: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 240.0
    answered_enough = threading.Event()
    victim = len(cluster.urls) - 1

    def client_loop(index: int) -> None:
        n = 0
        while time.monotonic() < stop_at and not (answered_enough.is_set() and n >= 30):
            request_id = f"c{index}-{n}"
            body = image_body(index * 10_000 + n, request_id=request_id)
            replica = (index + n) % len(cluster.urls)
            while True:  # retry on the next replica until one answers
                try:
                    response = httpx2.post(
                        f"{cluster.urls[replica]}{PREDICT}", json=body, headers=headers,
                        timeout=120,
                    )  # fmt: skip
                except httpx2.TransportError:
                    with lock:
                        broken.append(request_id)
                    replica = (replica + 1) % len(cluster.urls)
                    continue
                assert response.status_code == 200, response.text
                with lock:
                    answered[request_id] = answered.get(request_id, 0) + response.json()["charged"]
                    if replica == victim:
                        by_victim.append(request_id)
                break
            n += 1

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    while len(answered) < 100 and time.monotonic() < stop_at:
        time.sleep(0.05)
    os.kill(cluster.status["replica_pids"][victim], signal.SIGKILL)
    killed_at = len(answered)
    answered_enough.set()
    for thread in threads:
        thread.join(timeout=300)
    assert broken, "the kill broke no request: it did not happen under load"
    assert by_victim, "the killed replica answered nothing before it died"
    assert len(answered) > killed_at + 100, "the other replicas did not go on"
    stored = {request_id for request_id, charged in answered.items() if charged == 0}
    assert stored <= set(broken), "only a retried request may get a stored answer"
    rows = ledger_rows(cluster.status["database_url"], client_id)
    assert sorted(row["request_id"] for row in rows) == sorted(answered)
    assert sum(row["images"] for row in rows) == len(answered)
    store = store_at(cluster.status["database_url"])
    try:
        assert store.get_client(client_id).used == len(answered)
    finally:
        store.close()


def test_the_cluster_starts_its_postgresql_and_sigterm_stops_every_process(
    trained_checkpoints: Path,
) -> None:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="cluster-sigterm-"))
    running = start_cluster(root, trained_checkpoints, replicas=2, database_url=None)
    status = running.status
    pids = [*status["replica_pids"], status["detector_pid"]]
    postmaster = root / "state" / "postgres" / "data" / "postmaster.pid"
    try:
        output = running.log_path.read_text()
        for url in status["urls"]:
            assert f": {url}" in output, output
            assert httpx2.get(f"{url}/health", timeout=30).status_code == 200
        assert "admin token" in output and DEFAULT_ADMIN_TOKEN not in output
        postgres_pid = int(postmaster.read_text().split()[0])
        _, key = create_client(status["urls"][1], "on-postgres", 5)
        response = httpx2.post(
            f"{status['urls'][0]}{PREDICT}", json=image_body(0),
            headers={"Authorization": f"Bearer {key}"}, timeout=120,
        )  # fmt: skip
        assert response.json()["queries_remaining"] == 4
    finally:
        code = running.stop()
    assert code == 0, running.log_path.read_text()
    for pid in [*pids, postgres_pid]:
        assert not _alive(pid), f"process {pid} outlived the cluster"
    assert not postmaster.exists()
    assert not (root / "state" / "cluster.json").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def test_serve_workers_share_one_port_and_one_budget(
    trained_checkpoints: Path, fresh_postgres_url: str, tmp_path: Path
) -> None:
    server = LiveServer(
        checkpoint_dir=trained_checkpoints,
        state_dir=tmp_path / "state",
        env={"database_url": fresh_postgres_url, "detection_mode": "worker"},
        startup_timeout=STARTUP_SECONDS,
    )
    server.argv += ["--workers", "2"]
    with server:
        assert len(_spawned_children(server)) == 2, "uvicorn did not start 2 workers"
        client_id, key = admin_create_client(server, "workers", 40)
        codes: list[int] = []

        def send(index: int) -> None:
            with server.client(headers={"Authorization": f"Bearer {key}"}) as http:
                for attempt in range(8):
                    codes.append(
                        http.post(PREDICT, json=image_body(index * 100 + attempt)).status_code
                    )

        threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    assert sorted(codes) == [200] * 40 + [402] * 24
    assert sum(row["images"] for row in ledger_rows(fresh_postgres_url, client_id)) == 40


def _spawned_children(server: LiveServer) -> list[int]:
    """The server's multiprocessing workers (not its resource tracker)."""
    assert server.process is not None
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [
        int(child)
        for child in children
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]


def test_serve_workers_refuse_inline_detectors(trained_checkpoints: Path, tmp_path: Path) -> None:
    serve = ["serve", "--workers", "2", "--state-dir", str(tmp_path / "state")]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "target_service.cli",
            *serve,
            "--checkpoint-dir",
            str(trained_checkpoints),
        ],
        env=target_env({"models": [MODEL], "train_missing": False}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "TARGET_DETECTION_MODE=worker" in result.stderr
