"""Defences never switch themselves off silently (issue 8, items 9 and 10), through the API:

- a detector that raises is shown in error (admin views, /metrics), never makes the admin view
  answer 500, and is rebuilt from the query log on the client's next request or at restart, so
  it has seen every charged query once it works again;
- the ``block`` policy is checked under the per-client stream lock: no request that arrives
  while the alarming request is being observed is answered or charged.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from defenses.base import DETECTORS
from tests.target_service.faulty_detectors import FlakyDetector, TripDetector
from tests.target_service.test_api import (
    ADMIN_HEADERS,
    MODEL,
    bearer,
    create_client,
    images,
    make_app,
    payload,
)

FAULTY = "tests.target_service.faulty_detectors"


@pytest.fixture(autouse=True)
def faulty_kinds(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Register the misbehaving kinds, with their switches reset."""
    monkeypatch.setitem(DETECTORS, "flaky", f"{FAULTY}:FlakyDetector")
    monkeypatch.setitem(DETECTORS, "trip", f"{FAULTY}:TripDetector")
    monkeypatch.setattr(FlakyDetector, "failing", False)
    monkeypatch.setattr(TripDetector, "entered", threading.Event())
    monkeypatch.setattr(TripDetector, "release", threading.Event())
    yield
    TripDetector.release.set()  # never leave a server thread waiting


FLAKY_AND_PRADA = {MODEL: {"flaky": {}, "prada": {"delta": 0.95}}}


def send(http: TestClient, key: str, n: int, *, seed: int) -> Any:
    return http.post(
        f"/v1/models/{MODEL}/predict", json=payload(images(n, seed=seed)), headers=bearer(key)
    )


def client_view(http: TestClient, client_id: str) -> dict[str, Any]:
    response = http.get(f"/v1/admin/clients/{client_id}", headers=ADMIN_HEADERS)
    assert response.status_code == 200, response.text
    return response.json()


def detector_entries(http: TestClient, status: str) -> list[dict[str, Any]]:
    response = http.get("/v1/admin/alarms", headers=ADMIN_HEADERS)
    assert response.status_code == 200, response.text
    return [entry for entry in response.json() if entry["status"] == status]


def error_count(http: TestClient) -> float:
    response = http.get("/metrics", headers=ADMIN_HEADERS)
    assert response.status_code == 200, response.text
    text = response.text
    found = re.search(
        rf'^mlaas_detector_errors_total\{{detector="flaky",model="{MODEL}"\}} (\S+)$', text, re.M
    )
    return float(found.group(1)) if found else 0.0


def test_failing_detector_is_shown_counted_and_replayed_when_it_works_again(
    tmp_path: Path, trained_checkpoints: Path
) -> None:
    with make_app(tmp_path, trained_checkpoints, detectors=FLAKY_AND_PRADA) as http:
        client_id, key = create_client(http, "flaky-client", 100)
        for seed in range(3):
            assert send(http, key, 2, seed=seed).status_code == 200
        FlakyDetector.failing = True
        for seed in range(3, 5):  # answered and charged while the detector is broken
            assert send(http, key, 2, seed=seed).status_code == 200

        view = client_view(http, client_id)
        flaky, prada = view["detectors"]["flaky"], view["detectors"]["prada"]
        assert view["queries_used"] == 10
        assert flaky["status"] == "error" and flaky["message"] == "RuntimeError: injected failure"
        assert flaky["queries_seen"] < 10
        assert prada["status"] == "ok" and prada["message"] is None
        assert prada["queries_seen"] == 10  # the other detector went on
        [error] = detector_entries(http, "error")
        assert (error["client_id"], error["detector"], error["model"]) == (
            client_id,
            "flaky",
            MODEL,
        )
        assert error["message"] == "RuntimeError: injected failure"
        assert error["query_index"] == 8  # the last query of the batch it first failed on
        # the failing batch, then the failed rebuild on the next request
        assert error_count(http) == 2

        FlakyDetector.failing = False
        assert send(http, key, 2, seed=5).status_code == 200
        view = client_view(http, client_id)
        flaky = view["detectors"]["flaky"]
        assert flaky["status"] == "ok" and flaky["message"] is None
        assert flaky["queries_seen"] == view["queries_used"] == 12  # skipped queries replayed
        assert detector_entries(http, "error") == []
        assert error_count(http) == 2


def test_detector_in_error_survives_restart_and_is_rebuilt_from_snapshot_and_log(
    tmp_path: Path, trained_checkpoints: Path
) -> None:
    def app() -> TestClient:
        return make_app(tmp_path, trained_checkpoints, detectors=FLAKY_AND_PRADA, snapshot_every=4)

    with app() as http:
        client_id, key = create_client(http, "restart-client", 100)
        for seed in range(3):  # a snapshot after 4 queries, then 2 more
            assert send(http, key, 2, seed=seed).status_code == 200
        FlakyDetector.failing = True
        for seed in range(3, 5):
            assert send(http, key, 2, seed=seed).status_code == 200

    with app() as http:  # still failing: loading the stream fails again, the view still answers
        view = client_view(http, client_id)
        assert view["detectors"]["flaky"]["status"] == "error"
        assert view["detectors"]["prada"]["queries_seen"] == 10
        assert [e["detector"] for e in detector_entries(http, "error")] == ["flaky"]

    FlakyDetector.failing = False
    with app() as http:  # fixed: rebuilt from the snapshot and the log when the stream loads
        view = client_view(http, client_id)
        assert view["detectors"]["flaky"]["status"] == "ok"
        assert view["detectors"]["flaky"]["queries_seen"] == view["queries_used"] == 10
        assert view["detectors"]["prada"]["queries_seen"] == 10
        assert detector_entries(http, "error") == []


def test_block_holds_for_requests_that_straddle_the_alarm(
    tmp_path: Path, trained_checkpoints: Path
) -> None:
    at, concurrent = 3, 4
    with make_app(
        tmp_path,
        trained_checkpoints,
        detectors={MODEL: {"trip": {"at": at}}},
        alarm_policies={MODEL: "block"},
    ) as http:
        client_id, key = create_client(http, "straddler", 100)
        for seed in range(at - 1):
            assert send(http, key, 1, seed=seed).status_code == 200

        results: dict[str, int] = {}

        def request(tag: str, seed: int) -> None:
            results[tag] = send(http, key, 1, seed=seed).status_code

        alarming = threading.Thread(target=request, args=("alarming", at))
        alarming.start()
        assert TripDetector.entered.wait(timeout=30)  # being observed, alarm not yet recorded
        later = [
            threading.Thread(target=request, args=(f"later{i}", 100 + i)) for i in range(concurrent)
        ]
        for thread in later:
            thread.start()
        time.sleep(0.5)  # they passed the early block check and wait for the stream
        TripDetector.release.set()
        for thread in [alarming, *later]:
            thread.join(timeout=30)

        assert results.pop("alarming") == 200
        assert results == {f"later{i}": 403 for i in range(concurrent)}
        view = client_view(http, client_id)
        assert view["queries_used"] == at  # nothing charged after the alarming request
        assert view["detectors"]["trip"]["first_alarm_at"] == at
        assert view["blocked_on"] == [MODEL]
        assert send(http, key, 1, seed=999).json()["error"]["code"] == "blocked"


def test_unusable_snapshot_is_rebuilt_from_the_whole_query_log(
    tmp_path: Path, trained_checkpoints: Path
) -> None:
    def app() -> TestClient:
        return make_app(tmp_path, trained_checkpoints, detectors=FLAKY_AND_PRADA, snapshot_every=4)

    with app() as http:
        client_id, key = create_client(http, "torn-snapshot", 100)
        for seed in range(3):
            assert send(http, key, 2, seed=seed).status_code == 200
    [snapshot] = (tmp_path / "detectors" / client_id).iterdir()
    snapshot.write_bytes(b"not a snapshot")
    with app() as http:
        view = client_view(http, client_id)
        for detector in ("flaky", "prada"):
            assert view["detectors"][detector]["status"] == "ok"
            assert view["detectors"][detector]["queries_seen"] == view["queries_used"] == 6
