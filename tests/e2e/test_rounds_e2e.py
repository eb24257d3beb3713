"""Adaptive strategies against a real target-service process: every round is bought through the
metered HTTP oracle, the service charges exactly k, and a 402 in the middle of a round keeps the
labels bought."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest
from typer.testing import CliRunner

from attacker.cli import app
from target_service.testing import LiveServer, admin_create_client

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(module_server_factory: Callable[..., LiveServer]) -> LiveServer:
    return module_server_factory(detectors={"lenet5-mnist": {}})


def used(server: LiveServer, client_id: str) -> int:
    response = httpx2.get(
        f"{server.url}/v1/admin/clients/{client_id}", headers=server.admin_headers
    )
    return response.json()["queries_used"]


def run(server: LiveServer, key: str, folder: Path, *args: str) -> dict:
    result = CliRunner().invoke(
        app,
        [
            "run", "--url", server.url, "--api-key", key, "--epochs", "1", "--round-epochs", "1",
            "--batch-size", "32", "--no-transfer", "--cache", str(folder / "cache.sqlite3"),
            "--report-dir", str(folder), *args,
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads((folder / "report.json").read_text())


@pytest.mark.parametrize("method", ["knockoff-adaptive", "activethief-kcenter"])
def test_an_adaptive_strategy_is_charged_exactly_its_budget(
    server: LiveServer, tmp_path: Path, method: str
) -> None:
    client_id, key = admin_create_client(server, f"rounds-{method}", budget=1000)
    report = run(server, key, tmp_path, "--method", method, "--k", "60", "--rounds", "3")
    assert report["queries_bought"] == report["queries_paid"] == 60 == used(server, client_id)
    assert sum(record["bought"] for record in report["rounds"]) == 60
    assert report["stopped_by"] is None


def test_a_402_mid_round_keeps_the_labels_bought(server: LiveServer, tmp_path: Path) -> None:
    client_id, key = admin_create_client(server, "rounds-402", budget=50)
    report = run(
        server, key, tmp_path, "--method", "knockoff-adaptive", "--k", "60", "--rounds", "4"
    )
    assert report["stopped_by"] == "budget"
    assert report["rounds"][-1] == {"round": 4, "planned": 15, "bought": 5}
    assert report["queries_bought"] == report["queries_paid"] == 50 == used(server, client_id)
