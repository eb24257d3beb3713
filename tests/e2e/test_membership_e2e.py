"""Membership challenges against real target-service processes, played by `attacker membership`:
the threshold attack is charged exactly one query per candidate; an attack the output policy or
the budget cannot serve is refused before anything is bought."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx2
import numpy as np
import pytest
from typer.testing import CliRunner

from attacker.cli import app
from attacker.oracle import HttpOracle, ProbabilitiesUnavailable
from mlcore.datasets import load_dataset
from target_service.testing import LiveServer, admin_create_client

pytestmark = pytest.mark.e2e

MODEL = "lenet5-mnist"
N = 40


@pytest.fixture(scope="module")
def probabilities_server(module_server_factory: Callable[..., LiveServer]) -> LiveServer:
    return module_server_factory(detectors={MODEL: {}}, output_policies={MODEL: "probabilities:6"})


@pytest.fixture(scope="module")
def label_only_server(module_server_factory: Callable[..., LiveServer]) -> LiveServer:
    return module_server_factory(detectors={MODEL: {}})


def open_challenge(server: LiveServer, client_id: str, n: int = N) -> str:
    response = httpx2.post(
        f"{server.url}/v1/admin/membership-challenges",
        json={"model": MODEL, "client_id": client_id, "n": n, "seed": 7},
        headers=server.admin_headers,
    )
    assert response.status_code == 201, response.text
    return response.json()["challenge_id"]


def admin_get(server: LiveServer, path: str) -> dict:
    return httpx2.get(f"{server.url}{path}", headers=server.admin_headers).json()


def play(
    server: LiveServer, key: str, challenge: str, attack: str, report_dir: Path, *extra: str
) -> tuple[int, str]:
    """`attacker membership` (in this process, against the real server): exit code, output."""
    result = CliRunner().invoke(
        app,
        [
            "membership", "--url", server.url, "--api-key", key, "--challenge", challenge,
            "--attack", attack, "--report-dir", str(report_dir), *extra,
        ],
    )  # fmt: skip
    return result.exit_code, " ".join(result.output.split())


def test_threshold_attack_over_http_is_charged_one_query_per_candidate(
    probabilities_server: LiveServer, tmp_path: Path
) -> None:
    client_id, key = admin_create_client(probabilities_server, "mia", budget=1000)
    challenge = open_challenge(probabilities_server, client_id)
    code, output = play(probabilities_server, key, challenge, "threshold", tmp_path)
    assert code == 0, output
    report = json.loads((tmp_path / "membership.json").read_text())
    assert admin_get(probabilities_server, f"/v1/admin/clients/{client_id}")["queries_used"] == N
    assert report["queries_paid"] == N and report["queries_needed"] == N
    kept = admin_get(probabilities_server, f"/v1/admin/membership-challenges/{challenge}")["result"]
    for figure in ("auc", "balanced_accuracy", "tpr_at_1pct_fpr", "tpr_at_01pct_fpr"):
        assert report[figure] == kept[figure]
    assert 0.0 <= report["auc"] <= 1.0 and report["output_policy"] == "probabilities:6"
    assert (tmp_path / "roc.png").stat().st_size > 0
    code, output = play(probabilities_server, key, challenge, "threshold", tmp_path / "again")
    assert code == 2 and "already scored" in output
    assert admin_get(probabilities_server, f"/v1/admin/clients/{client_id}")["queries_used"] == N


def test_predict_probabilities_is_metered_like_labels(probabilities_server: LiveServer) -> None:
    _, key = admin_create_client(probabilities_server, "probe", budget=100)
    images = load_dataset("mnist-embedded:pool").images[:5].numpy()
    with HttpOracle(probabilities_server.url, key, MODEL, batch_size=2) as oracle:
        probabilities = oracle.predict_probabilities(images)
        assert probabilities.shape == (5, 10) and probabilities.dtype == np.float64
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
        assert oracle.meter.paid == 5
        assert (oracle.predict_labels(images) == probabilities.argmax(axis=1)).all()
        assert oracle.meter.paid == 5 and oracle.meter.replayed == 5  # same batches: replayed


def test_a_label_only_model_refuses_probability_attacks_before_buying(
    label_only_server: LiveServer, tmp_path: Path
) -> None:
    client_id, key = admin_create_client(label_only_server, "blind", budget=1000)
    challenge = open_challenge(label_only_server, client_id)
    for attack in ("threshold", "lira"):
        code, output = play(label_only_server, key, challenge, attack, tmp_path / attack)
        assert code == 2 and "'probabilities:DECIMALS' policy" in output, output
    with (
        HttpOracle(label_only_server.url, key, MODEL) as oracle,
        pytest.raises(ProbabilitiesUnavailable, match="'label-only' output policy"),
    ):
        oracle.predict_probabilities(np.zeros((2, 1, 28, 28), np.uint8))
    assert admin_get(label_only_server, f"/v1/admin/clients/{client_id}")["queries_used"] == 0
    code, output = play(label_only_server, key, challenge, "gap", tmp_path / "gap")
    assert code == 0, output
    assert admin_get(label_only_server, f"/v1/admin/clients/{client_id}")["queries_used"] == N


def test_a_budget_too_small_is_refused_before_buying(
    label_only_server: LiveServer, tmp_path: Path
) -> None:
    client_id, key = admin_create_client(label_only_server, "poor", budget=100)
    challenge = open_challenge(label_only_server, client_id)
    code, output = play(label_only_server, key, challenge, "augmentation", tmp_path, "--shift", "1")
    assert code == 2 and f"needs {9 * N} queries for {N} candidates" in output, output
    assert admin_get(label_only_server, f"/v1/admin/clients/{client_id}")["queries_used"] == 0
    view = admin_get(label_only_server, f"/v1/admin/membership-challenges/{challenge}")
    assert view["result"] is None
