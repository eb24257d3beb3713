"""The attacker against a real target-service process: retries that pay once, a clean stop at
402 with the labels kept, the answer cache, and `attacker run` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx2
import numpy as np
import pytest

from attacker.oracle import BudgetExhausted, HttpOracle
from mlcore.checkpoints import load_checkpoint
from mlcore.datasets import load_dataset
from target_service.testing import LiveServer, admin_create_client

pytestmark = pytest.mark.e2e

NO_DETECTORS = {"lenet5-mnist": {}}


class LoseFirstAnswer(httpx2.BaseTransport):
    """Forwards every request to the real server, but drops the first answer on the floor (the
    server has charged; the client sees a network error), as a flaky network would."""

    def __init__(self) -> None:
        self.inner = httpx2.HTTPTransport()
        self.dropped = 0

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = self.inner.handle_request(request)
        if self.dropped == 0:
            response.read()
            response.close()
            self.dropped += 1
            raise httpx2.ReadError("connection reset after the server answered", request=request)
        return response


def used(server: LiveServer, client_id: str) -> int:
    response = httpx2.get(
        f"{server.url}/v1/admin/clients/{client_id}", headers=server.admin_headers
    )
    return response.json()["queries_used"]


@pytest.fixture(scope="module")
def server(module_server_factory: Callable[..., LiveServer]) -> LiveServer:
    return module_server_factory(detectors=NO_DETECTORS)


def pool_images(n: int) -> np.ndarray:
    return load_dataset("mnist-embedded:pool").images[:n].numpy()


def test_a_retry_after_a_lost_answer_is_charged_once(server: LiveServer, tmp_path: Path) -> None:
    client_id, key = admin_create_client(server, "flaky", budget=100)
    transport = LoseFirstAnswer()
    client = httpx2.Client(transport=transport, base_url=server.url, timeout=60)
    with HttpOracle(server.url, key, "lenet5-mnist", client=client, backoff=0.01) as oracle:
        labels = oracle.predict_labels(pool_images(30))
    assert transport.dropped == 1
    assert len(labels) == 30 and (labels >= 0).all()
    assert used(server, client_id) == 30
    # the lost answer's charge is this run's: paid, not a replay
    assert oracle.meter.report() == {
        "queries_paid": 30, "queries_replayed": 0, "queries_from_cache": 0, "queries_rejected": 0
    }  # fmt: skip
    with HttpOracle(server.url, key, "lenet5-mnist") as again:  # a new run, no answer cache
        again.predict_labels(pool_images(30))
    assert (again.meter.paid, again.meter.replayed) == (0, 30)
    assert used(server, client_id) == 30


def test_402_stops_with_the_labels_bought_and_the_cache_saves_the_rerun(
    server: LiveServer, tmp_path: Path
) -> None:
    cache = tmp_path / "answers.sqlite3"
    client_id, key = admin_create_client(server, "thrifty", budget=150)
    x = pool_images(300)
    with (
        HttpOracle(server.url, key, "lenet5-mnist", cache_path=cache, batch_size=100) as oracle,
        pytest.raises(BudgetExhausted, match="does not fit the remaining budget of 50") as caught,
    ):
        oracle.predict_labels(x)
    bought = caught.value.labels
    assert (bought[:100] >= 0).all() and (bought[100:] == -1).all()
    assert used(server, client_id) == 100

    with HttpOracle(
        server.url, key, "lenet5-mnist", cache_path=cache, batch_size=100
    ) as oracle:  # the same account again: its cache saves what it bought
        with pytest.raises(BudgetExhausted):
            oracle.predict_labels(x)
        assert oracle.meter.from_cache == 100 and oracle.meter.paid == 0
    assert used(server, client_id) == 100

    second_id, second_key = admin_create_client(server, "rerun", budget=300)
    with HttpOracle(
        server.url, second_key, "lenet5-mnist", cache_path=cache, batch_size=100
    ) as oracle:  # another account does not see those labels: it pays for all of them
        labels = oracle.predict_labels(x)
        assert oracle.meter.from_cache == 0 and oracle.meter.paid == 300
    assert labels[:100].tolist() == bought[:100].tolist()
    with HttpOracle(server.url, second_key, "lenet5-mnist", cache_path=cache) as oracle:
        assert oracle.predict_labels(x).tolist() == labels.tolist()
        assert oracle.meter.paid == 0 and oracle.meter.from_cache == 300
    assert used(server, second_id) == 300


def test_attacker_run_steals_a_substitute_that_agrees_with_the_target(
    server: LiveServer, tmp_path: Path, trained_checkpoints: Path
) -> None:
    client_id, key = admin_create_client(server, "drmi", budget=400)
    _, eval_key = admin_create_client(server, "evaluator", budget=1000)
    report_dir = tmp_path / "report"
    command = [
        sys.executable, "-m", "attacker.cli", "run", "--url", server.url, "--api-key", key,
        "--eval-api-key", eval_key, "--model", "lenet5-mnist", "--method", "drmi", "--k", "300",
        "--epochs", "10", "--cache", str(tmp_path / "cache.sqlite3"), "--report-dir", str(report_dir),
        "--no-transfer",
    ]  # fmt: skip
    subprocess.run(command, check=True, timeout=900)
    report = json.loads((report_dir / "report.json").read_text())
    assert report["method"] == "drmi" and report["k"] == 300
    assert report["queries_bought"] == 300 == report["queries_paid"] == used(server, client_id)
    assert report["stopped_by"] is None
    # Measured on this setup: agreement 0.87, substitute accuracy 0.745 against the target's 0.80;
    # a substitute of random labels would score about 0.1 on both.
    target_accuracy = load_checkpoint(trained_checkpoints / "lenet5-mnist.pt").metrics[
        "test_accuracy"
    ]
    assert 0.8 <= report["agreement"] <= 1.0, report
    assert report["substitute_accuracy"] >= target_accuracy - 0.12, (report, target_accuracy)
    assert (report_dir / "report.md").exists()
