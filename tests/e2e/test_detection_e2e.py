"""Detectors inside a real server: alarms, the block policy, and durability across kill -9."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import httpx2
import numpy as np
import pytest

from mlcore.datasets import load_dataset
from mlcore.wire import encode_tensor
from target_service.testing import LiveServer, admin_create_client

pytestmark = pytest.mark.e2e

PRADA_ONLY = {"lenet5-mnist": {"prada": {"delta": 0.95}}}


def synthetic_steps(batches: int, *, size: int = 10, seed: int = 0) -> list[np.ndarray]:
    """A JbDA-like stream: natural seeds moved by fixed-size sign steps, batch after batch."""
    rng = np.random.default_rng(seed)
    x = load_dataset("mnist-embedded:pool").images[:size].float().numpy() / 255.0
    out = []
    for _ in range(batches):
        x = np.clip(x + 0.1 * np.sign(rng.standard_normal(x.shape)), 0.0, 1.0).astype(np.float32)
        out.append(x)
    return out


def predict(server: LiveServer, key: str, x: np.ndarray) -> httpx2.Response:
    return httpx2.post(
        f"{server.url}/v1/models/lenet5-mnist/predict",
        json={"inputs": encode_tensor(x).model_dump()},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def admin(server: LiveServer, path: str) -> Any:
    response = httpx2.get(f"{server.url}{path}", headers=server.admin_headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def send_until_refused(
    server: LiveServer, key: str, batches: list[np.ndarray]
) -> tuple[int, httpx2.Response | None]:
    answered = 0
    for x in batches:
        response = predict(server, key, x)
        if response.status_code != 200:
            return answered, response
        answered += len(x)
    return answered, None


def test_block_policy_refuses_after_the_alarm_and_survives_kill_9(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory(detectors=PRADA_ONLY, alarm_policies={"lenet5-mnist": "block"})
    client_id, key = admin_create_client(server, "jbda", budget=2000)
    answered, refused = send_until_refused(server, key, synthetic_steps(60))

    assert refused is not None, "PRADA never fired on a stream of fixed-size synthetic steps"
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "blocked"
    view = admin(server, f"/v1/admin/clients/{client_id}")
    assert view["queries_used"] == answered  # the refused request was not charged
    first_alarm = view["detectors"]["prada"]["first_alarm_at"]
    assert first_alarm is not None and 100 < first_alarm <= answered
    assert view["blocked_on"] == ["lenet5-mnist"]
    alarms = admin(server, "/v1/admin/alarms")
    assert [(a["client_id"], a["detector"], a["query_index"]) for a in alarms] == [
        (client_id, "prada", first_alarm)
    ]

    server.kill(signal.SIGKILL)
    server.start()
    after = admin(server, f"/v1/admin/clients/{client_id}")
    assert after["queries_used"] == answered
    assert after["detectors"]["prada"]["first_alarm_at"] == first_alarm
    assert after["detectors"]["prada"]["queries_seen"] == answered  # rebuilt from the query log
    assert admin(server, "/v1/admin/alarms") == alarms
    again = predict(server, key, synthetic_steps(1, seed=9)[0])
    assert again.status_code == 403
    assert admin(server, f"/v1/admin/clients/{client_id}")["queries_used"] == answered


def test_log_policy_records_the_alarm_and_keeps_answering(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory(detectors=PRADA_ONLY)
    client_id, key = admin_create_client(server, "jbda", budget=2000)
    answered, refused = send_until_refused(server, key, synthetic_steps(30))

    assert refused is None and answered == 300
    view = admin(server, f"/v1/admin/clients/{client_id}")
    assert view["detectors"]["prada"]["first_alarm_at"] is not None
    assert view["detectors"]["prada"]["threshold"] == 0.95
    assert view["blocked_on"] == []


def test_benign_natural_queries_raise_no_alarm(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory(detectors=PRADA_ONLY, alarm_policies={"lenet5-mnist": "block"})
    client_id, key = admin_create_client(server, "benign", budget=1000)
    test = load_dataset("mnist-embedded:test").images.numpy()
    order = np.random.default_rng(1).permutation(len(test))[:300]
    answered, refused = send_until_refused(
        server, key, [test[order[i : i + 20]] for i in range(0, 300, 20)]
    )

    assert refused is None and answered == 300
    prada = admin(server, f"/v1/admin/clients/{client_id}")["detectors"]["prada"]
    assert prada["first_alarm_at"] is None
    assert prada["statistic"] is not None and prada["statistic"] >= 0.95


def test_detector_state_resumes_from_snapshot_and_log_after_kill_9(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory(snapshot_every=50)  # both default detectors
    client_id, key = admin_create_client(server, "steady", budget=1000)
    test = load_dataset("mnist-embedded:test").images.numpy()
    for start in range(0, 130, 10):
        assert predict(server, key, test[start : start + 10]).status_code == 200
    before = admin(server, f"/v1/admin/clients/{client_id}")["detectors"]

    server.kill(signal.SIGKILL)
    server.start()
    after = admin(server, f"/v1/admin/clients/{client_id}")["detectors"]
    assert after == before
    assert set(after) == {"prada", "mi_redundancy"}
    assert after["prada"]["max_stored"] == 20_000 and 0 < after["prada"]["stored"] <= 130
    assert after["mi_redundancy"]["stored"] is None  # PRADA's figure only
    assert after["mi_redundancy"]["queries_seen"] == 130


def test_prada_memory_is_capped_and_shown_in_the_admin_view(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    """max_stored=50: the set stops at 50 queries while every query is still tested; the
    admin view shows it, also after a kill -9 (compressed snapshot plus log replay)."""
    server = live_server_factory(
        detectors={"lenet5-mnist": {"prada": {"max_stored": 50}}}, snapshot_every=100
    )
    client_id, key = admin_create_client(server, "many", budget=1000)
    test = load_dataset("mnist-embedded:pool").images.numpy()
    answered, refused = send_until_refused(
        server, key, [test[i : i + 25] for i in range(0, 250, 25)]
    )
    assert refused is None and answered == 250
    prada = admin(server, f"/v1/admin/clients/{client_id}")["detectors"]["prada"]
    assert prada["queries_seen"] == 250 and prada["statistic"] is not None
    assert prada["max_stored"] == 50
    assert 50 <= prada["stored"] <= 50 + 9  # + the first query of a class new after the cap
    snapshots = list((server.state_dir / "detectors").rglob("*"))
    assert [p.suffix for p in snapshots if p.is_file()] == [".npz"]

    server.kill(signal.SIGKILL)
    server.start()
    assert admin(server, f"/v1/admin/clients/{client_id}")["detectors"]["prada"] == prada


def test_cli_jbda_is_blocked_and_a_benign_simulator_is_not(
    live_server_factory: Callable[..., LiveServer], tmp_path
) -> None:
    import json
    import subprocess
    import sys

    server = live_server_factory(detectors=PRADA_ONLY, alarm_policies={"lenet5-mnist": "block"})
    _, benign_key = admin_create_client(server, "benign", budget=1000)
    jbda_id, jbda_key = admin_create_client(server, "jbda", budget=2000)
    common = [sys.executable, "-m", "attacker.cli"]
    benign = subprocess.run(
        [*common, "simulate-benign", "--url", server.url, "--api-key", benign_key,
         "--queries", "300", "--repeat-rate", "0"],
        timeout=600,
    )  # fmt: skip
    assert benign.returncode == 0
    subprocess.run(
        [*common, "run", "--url", server.url, "--api-key", jbda_key, "--method", "jbda", "--k", "800",
         "--no-transfer", "--cache", str(tmp_path / "c.sqlite3"), "--report-dir", str(tmp_path / "r")],
        check=True, timeout=900,
    )  # fmt: skip
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["method"] == "jbda" and report["stopped_by"] == "blocked"
    assert report["queries_bought"] < 800
    assert admin(server, f"/v1/admin/clients/{jbda_id}")["queries_used"] == report["queries_bought"]


@pytest.mark.slow
def test_the_default_service_raises_no_alarm_on_the_default_benign_simulator(tmp_path) -> None:
    """Defaults that agree: a first start trains the missing checkpoint and calibrates its
    detectors (default share, horizon and clients; a 1-epoch model to keep it short), and the
    default `attacker simulate-benign` (1,000 queries, 10% near-duplicates) raises no alarm in
    either default detector. With the old fixed PRADA delta 0.95 it was flagged at query 130."""
    import subprocess
    import sys

    from defenses.calibration import Calibration

    checkpoint_dir = tmp_path / "checkpoints"
    server = LiveServer(
        checkpoint_dir=checkpoint_dir,
        state_dir=tmp_path / "state",
        log_path=tmp_path / "server.log",
        env={"train_missing": True, "train_epochs": 1},
        startup_timeout=1800,
    )
    with server:
        calibration = Calibration.load(checkpoint_dir / "lenet5-mnist.calibration.json")
        assert (calibration.share, calibration.horizon) == (0.01, 1000)
        client_id, key = admin_create_client(server, "benign", budget=1000)
        subprocess.run(
            [sys.executable, "-m", "attacker.cli", "simulate-benign", "--url", server.url,
             "--api-key", key],
            check=True, timeout=900,
        )  # fmt: skip
        view = admin(server, f"/v1/admin/clients/{client_id}")
        assert view["queries_used"] == 1000
        assert set(view["detectors"]) == {"prada", "mi_redundancy"}
        for name, detector in view["detectors"].items():
            assert detector["queries_seen"] == 1000
            assert detector["statistic"] is not None
            assert detector["threshold"] == calibration.threshold(name)
            assert detector["first_alarm_at"] is None, (name, detector)
        assert admin(server, "/v1/admin/alarms") == []
