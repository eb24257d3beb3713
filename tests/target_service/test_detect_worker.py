"""Detection off the request path (issue 14, items 3 and 5), in-process: the same alarms as
inline detection, ``block`` once the worker has recorded the alarm, and cross-client groups
(an org's accounts watched as one stream, first alarm in union queries).

The real-process cases (a worker killed mid-stream, two workers at once) are in
tests/e2e/test_detect_worker_e2e.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from defenses.base import make_detector
from target_service.detect_worker import DetectionWorker, hosted_defences
from target_service.settings import Settings
from target_service.state import SQLiteStore, open_store
from tests.e2e.test_detection_e2e import synthetic_steps
from tests.target_service.test_api import (
    ADMIN,
    ADMIN_HEADERS,
    MAX_BATCH,
    MODEL,
    bearer,
    create_client,
    make_app,
    payload,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRADA = {MODEL: {"prada": {"delta": 0.95}}}
STEPS = synthetic_steps(40, size=MAX_BATCH)  # a JbDA-like stream PRADA flags within 320 queries


def drain(state_dir: Path, checkpoint_dir: Path, **overrides: Any) -> None:
    """Run a detection worker in this process until no stream has queries left to see."""
    settings = worker_settings(state_dir, checkpoint_dir, **overrides)
    store = open_store(settings)
    try:
        worker = DetectionWorker(settings, store, hosted_defences(settings))
        while worker.step():
            pass
        worker.close()
    finally:
        store.close()


def worker_settings(state_dir: Path, checkpoint_dir: Path, **overrides: Any) -> Settings:
    return Settings(
        admin_token=ADMIN, state_dir=state_dir, checkpoint_dir=checkpoint_dir, models=[MODEL],
        train_missing=False, detectors=PRADA, detection_mode="worker", **overrides,
    )  # fmt: skip


def alarms(http: TestClient) -> list[dict[str, Any]]:
    response = http.get("/v1/admin/alarms", headers=ADMIN_HEADERS)
    assert response.status_code == 200, response.text
    return [a for a in response.json() if a["status"] == "alarm"]


def send(http: TestClient, key: str, x: np.ndarray) -> int:
    return http.post(
        f"/v1/models/{MODEL}/predict", json=payload(x), headers=bearer(key)
    ).status_code


def test_inline_and_worker_modes_give_the_same_first_alarm_at(
    tmp_path: Path, trained_checkpoints: Path
) -> None:
    first: dict[str, list[tuple[str, int]]] = {}
    for mode in ("inline", "worker"):
        state = tmp_path / mode
        with make_app(state, trained_checkpoints, detectors=PRADA, detection_mode=mode) as http:
            client_id, key = create_client(http, "jbda", budget=1000)
            assert all(send(http, key, x) == 200 for x in STEPS)
            if mode == "worker":
                assert alarms(http) == []  # the requests ran no detector
                drain(state, trained_checkpoints)
            found = alarms(http)
            assert {a["client_id"] for a in found} == {client_id}
            first[mode] = [(a["detector"], a["query_index"]) for a in found]
            view = http.get(f"/v1/admin/clients/{client_id}", headers=ADMIN_HEADERS).json()
            assert view["detectors"]["prada"]["first_alarm_at"] == first[mode][0][1]
            assert view["detectors"]["prada"]["queries_seen"] == len(STEPS) * MAX_BATCH
    assert first["worker"] == first["inline"]
    assert len(first["inline"]) == 1 and 100 < first["inline"][0][1] <= len(STEPS) * MAX_BATCH


def test_worker_mode_blocks_once_the_worker_recorded_the_alarm(
    tmp_path: Path, trained_checkpoints: Path
) -> None:
    policies = {"alarm_policies": {MODEL: "block"}}
    with make_app(
        tmp_path, trained_checkpoints, detectors=PRADA, detection_mode="worker", **policies
    ) as http:
        client_id, key = create_client(http, "jbda", budget=1000)
        assert all(send(http, key, x) == 200 for x in STEPS)  # nothing blocks before the worker
        drain(tmp_path, trained_checkpoints, **policies)
        response = http.post(
            f"/v1/models/{MODEL}/predict", json=payload(STEPS[0]), headers=bearer(key)
        )
        assert response.status_code == 403 and response.json()["error"]["code"] == "blocked"
        view = http.get(f"/v1/admin/clients/{client_id}", headers=ADMIN_HEADERS).json()
        assert view["queries_used"] == len(STEPS) * MAX_BATCH  # the refusal was not charged
        assert view["blocked_on"] == [MODEL]


def union_first_alarm(batches: list[np.ndarray], labels: list[list[int]]) -> int | None:
    detector = make_detector("prada", delta=0.95)
    for x, y in zip(batches, labels, strict=True):
        detector.observe(torch.from_numpy(x), torch.as_tensor(y))
    return detector.first_alarm_at


def test_org_groups_watch_the_union_of_their_accounts_and_block_them_all(
    tmp_path: Path, trained_checkpoints: Path
) -> None:
    """Two Sybil accounts of one org split the stream round-robin: each alone sends half, the
    org's detector sees the union and fires at the union's query index; both are blocked, and
    a client of no org is not."""
    groups = {"detection_groups": "org", "alarm_policies": {MODEL: "block"}}
    with make_app(
        tmp_path, trained_checkpoints, detectors=PRADA, detection_mode="worker", **groups
    ) as http:
        keys, ids = [], []
        for name in ("sybil-1", "sybil-2"):
            response = http.post(
                "/v1/admin/clients",
                json={"name": name, "budget": 1000, "org": "acme"},
                headers=ADMIN_HEADERS,
            )
            assert response.status_code == 201 and response.json()["org"] == "acme"
            ids.append(response.json()["client_id"])
            keys.append(response.json()["api_key"])
        loner_id, loner = create_client(http, "loner", budget=1000)
        labels = []
        for i, x in enumerate(STEPS):
            response = http.post(
                f"/v1/models/{MODEL}/predict", json=payload(x), headers=bearer(keys[i % 2])
            )
            assert response.status_code == 200
            labels.append(response.json()["labels"])
        assert send(http, loner, STEPS[0]) == 200
        drain(tmp_path, trained_checkpoints, **groups)

        found = alarms(http)
        group = [a for a in found if a["stream"] == "org:acme"]
        assert [a["detector"] for a in group] == ["prada"]
        assert group[0]["query_index"] == union_first_alarm(STEPS, labels)
        assert group[0]["client_id"] in ids
        own = {a["client_id"]: a["query_index"] for a in found if a["stream"] is None}
        for i, client_id in enumerate(ids):  # each account is still watched on its own
            assert own.get(client_id) == union_first_alarm(STEPS[i::2], labels[i::2])
        assert loner_id not in own
        for key in keys:
            assert send(http, key, STEPS[1]) == 403
        assert send(http, loner, STEPS[1]) == 200
        listed = http.get("/v1/admin/clients", headers=ADMIN_HEADERS).json()
        assert {row["client_id"]: row["org"] for row in listed} == {
            ids[0]: "acme", ids[1]: "acme", loner_id: None,
        }  # fmt: skip


@pytest.fixture(scope="module")
def org_app(
    tmp_path_factory: pytest.TempPathFactory, trained_checkpoints: Path
) -> Iterator[TestClient]:
    with make_app(tmp_path_factory.mktemp("org-state"), trained_checkpoints) as client:
        yield client


@pytest.mark.parametrize("org", ["", "a b", "-x", "x" * 65, "org:acme", "../up"])
def test_bad_org_is_refused_naming_it(org_app: TestClient, org: str) -> None:
    response = org_app.post(
        "/v1/admin/clients", json={"name": "x", "budget": 1, "org": org}, headers=ADMIN_HEADERS
    )
    assert response.status_code == 422
    assert "org" in response.json()["error"]["message"]


def test_groups_need_worker_mode_and_all_refuses_block(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="TARGET_DETECTION_MODE=worker"):
        Settings(state_dir=tmp_path, detection_groups="org")
    with pytest.raises(ValueError, match="block every client"):
        Settings(
            state_dir=tmp_path,
            detection_mode="worker",
            detection_groups="all",
            alarm_policies={"lenet5-mnist": "block"},
        )


def test_create_client_cli_stores_the_org_and_refuses_a_bad_one(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from target_service.cli import app

    args = ["create-client", "--name", "s1", "--budget", "10", "--state-dir", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--org", "acme"])
    assert result.exit_code == 0, result.output
    fields = dict(line.split(" ", 1) for line in result.output.splitlines())
    store = SQLiteStore(tmp_path / "state.sqlite3")
    try:
        assert store.authenticate(fields["api_key"]).client_id == fields["client_id"]
        assert store.client_orgs() == {fields["client_id"]: "acme"}
    finally:
        store.close()
    refused = CliRunner().invoke(app, [*args, "--org", "a b"])
    assert refused.exit_code == 2 and "--org must be 1-64 letters" in refused.output
