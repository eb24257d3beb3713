"""The service client's one request loop, against a scripted transport: what is retried (and
what never is, so nothing is created twice), and how each refusal becomes an exception."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx2
import numpy as np
import pytest

from mlcore.client import (
    Blocked,
    BudgetExhausted,
    NotFound,
    Rejected,
    ServiceClient,
    ServiceError,
    Unavailable,
    read_prediction,
)


def scripted(statuses: list[int], seen: list[httpx2.Request]) -> Callable:
    """A service answering the given statuses in turn (the last one for ever)."""

    def handle(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        status = statuses[min(len(seen) - 1, len(statuses) - 1)]
        if status == 0:
            raise httpx2.ConnectError("connection refused")
        if status < 300:
            return httpx2.Response(status, json={"ok": True, "models": []})
        return httpx2.Response(status, json={"error": {"code": f"c{status}", "message": "no"}})

    return handle


def client(statuses: list[int], seen: list[httpx2.Request]) -> ServiceClient:
    http = httpx2.Client(
        transport=httpx2.MockTransport(scripted(statuses, seen)), base_url="http://t"
    )
    return ServiceClient("http://t", "key", client=http, backoff=0.0, max_retries=3)


X = np.zeros((2, 1, 8, 8), dtype=np.uint8)


@pytest.mark.parametrize(
    ("statuses", "attempts"),
    [([200], 1), ([503, 200], 2), ([429, 500, 200], 3), ([0, 200], 2)],
    ids=["first", "after-503", "after-429-and-500", "after-network-error"],
)
def test_repeatable_requests_are_retried_until_they_succeed(
    statuses: list[int], attempts: int
) -> None:
    seen: list[httpx2.Request] = []
    reply = client(statuses, seen).predict("m", X, request_id="r1")
    assert reply.attempts == attempts == len(seen)
    assert all(json.loads(r.content)["request_id"] == "r1" for r in seen)  # same id every time
    assert seen[0].headers["authorization"] == "Bearer key"


@pytest.mark.parametrize("status", [500, 503, 0], ids=["500", "503", "network"])
def test_creating_requests_are_not_retried_after_the_service_may_have_acted(
    status: int, tmp_path: Path
) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, images=X, labels=np.array([0, 1]))
    for call in (
        lambda c: c.upload_dataset(path, name="d"),
        lambda c: c.submit_job(dataset_id="d", arch="lenet5", name="m"),
        lambda c: c.predict("m", X),  # no request_id: a repeat could be charged twice
    ):
        seen: list[httpx2.Request] = []
        with pytest.raises(Unavailable):
            call(client([status, 200], seen))
        assert len(seen) == 1


def test_creating_requests_are_retried_on_429() -> None:
    seen: list[httpx2.Request] = []
    reply = client([429, 202], seen).submit_job(dataset_id="d", arch="lenet5", name="m", seed=None)
    assert reply == {"ok": True, "models": []} and len(seen) == 2
    assert json.loads(seen[0].content) == {"dataset_id": "d", "arch": "lenet5", "name": "m"}


@pytest.mark.parametrize(
    ("status", "kind"),
    [(402, BudgetExhausted), (403, Blocked), (404, NotFound), (409, Rejected), (422, Rejected)],
)
def test_refusals_raise_at_once_with_the_service_code(status: int, kind: type) -> None:
    seen: list[httpx2.Request] = []
    with pytest.raises(kind) as caught:
        client([status, 200], seen).job("j1")
    assert (caught.value.status, caught.value.code) == (status, f"c{status}")
    assert f"HTTP {status} c{status}: no" in str(caught.value)
    assert len(seen) == 1


def test_gives_up_after_max_retries() -> None:
    seen: list[httpx2.Request] = []
    with pytest.raises(Unavailable, match="gave up after 4 attempts; last: HTTP 503"):
        client([503], seen).models()
    assert len(seen) == 4


def test_wait_for_job_follows_until_final() -> None:
    states = iter(["queued", "running", "running", "succeeded", "never"])
    seen_states: list[str] = []

    def handle(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, json={"job_id": "j", "status": next(states)})

    http = httpx2.Client(transport=httpx2.MockTransport(handle), base_url="http://t")
    job = ServiceClient("http://t", "k", client=http).wait_for_job(
        "j", poll=0.0, on_update=lambda j: seen_states.append(j["status"])
    )
    assert job["status"] == "succeeded"
    assert seen_states == ["queued", "running", "running", "succeeded"]


# -- reading a predict answer ---------------------------------------------------------------------
USAGE = {"charged": 3, "queries_used": 3, "queries_remaining": 7}


@pytest.mark.parametrize(
    ("body", "labels", "rejected"),
    [
        ({"labels": [1, 2, 3], **USAGE}, [1, 2, 3], []),
        ({"labels": [1, 2, 3], "top_k": [[1], [2], [3]], **USAGE}, [1, 2, 3], []),
        ({"labels": [1, None, 3], "rejected": [1], **USAGE}, [1, None, 3], [1]),
        (
            {"labels": [None, 2, None], "top_k": [None, [2, 0], None], "rejected": [0, 2], **USAGE},
            [None, 2, None],
            [0, 2],
        ),
        (
            {
                "labels": [None, 2, 0],
                "probabilities": [None, [0.5, 0.5], [1, 0]],
                "rejected": [0],
                **USAGE,
            },
            [None, 2, 0],
            [0],
        ),
    ],
)
def test_read_prediction_reads_every_answer_shape(
    body: dict, labels: list, rejected: list[int]
) -> None:
    prediction = read_prediction(body)
    assert prediction.labels == labels and prediction.rejected == rejected
    assert (prediction.charged, prediction.queries_used, prediction.queries_remaining) == (3, 3, 7)


@pytest.mark.parametrize(
    "body",
    [
        {"labels": [1, None], **USAGE},  # a null label without the rejected list
        {"labels": [1, 2], "rejected": ["1"], **USAGE},
        {"labels": [1], "logits": [[0.1]], **USAGE},  # nothing beyond the schema
        {"labels": [1]},
    ],
)
def test_read_prediction_refuses_what_the_schema_does_not_allow(body: dict) -> None:
    with pytest.raises(ServiceError, match="does not fit the schema"):
        read_prediction(body)
