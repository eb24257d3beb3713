"""A scripted stand-in for the target service's predict route, for the attacker's tests.

``FakeService`` answers like the real one (labels, ``charged``, ``queries_used``,
``queries_remaining``; a repeated ``request_id`` of the same key is replayed with ``charged: 0``; a batch that
does not fit the budget gets 402; past ``block_after`` charged queries every request gets 403;
images ``reject`` picks get a ``null`` label and their index in ``rejected``, charged, as an
input defence in ``framework`` mode answers).
``route_http_to(service, monkeypatch)`` makes every ``HttpOracle`` the CLI builds talk to it.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx2
import numpy as np
import pytest

from mlcore.wire import EncodedTensor, decode_tensor


class FakeService:
    """Labels each image with its first pixel mod 10; scripted failures before answering.

    ``failures``: status codes returned (uncharged) before the next answer; ``lose``: status
    codes returned *after* charging the next request, as if its answer were lost on the way.
    """

    def __init__(
        self,
        *,
        budget: int = 10_000,
        failures: list[int] | None = None,
        lose: list[int] | None = None,
        block_after: int | None = None,
        reject: Callable[[np.ndarray], bool] | None = None,
    ) -> None:
        self.budget, self.used = budget, 0
        self.failures = list(failures or [])
        self.lose = list(lose or [])
        self.block_after = block_after
        self.reject = reject
        self.rejected = 0  # images refused (and charged)
        self.requests: list[dict] = []
        self.answers: dict[tuple[str, str], dict] = {}  # (key, request_id) -> stored answer

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        self.requests.append(body)
        if self.failures:
            return _error(self.failures.pop(0), "x", "scripted")
        request_id = (request.headers["authorization"], body["request_id"])  # ids are per client
        if request_id in self.answers:
            return httpx2.Response(200, json={**self.answers[request_id], "charged": 0})
        if self.block_after is not None and self.used >= self.block_after:
            return _error(403, "blocked", "a detector blocked this client")
        images = decode_tensor(EncodedTensor(**body["inputs"]))
        if self.used + len(images) > self.budget:
            return _error(402, "budget_exhausted", "no budget")
        self.used += len(images)
        refused = [i for i, image in enumerate(images) if self.reject and self.reject(image)]
        self.rejected += len(refused)
        answer = {
            "labels": [
                None if i in refused else int(image.reshape(-1)[0]) % 10
                for i, image in enumerate(images)
            ],
            **({"rejected": refused} if refused else {}),
            "charged": len(images),
            "queries_used": self.used,
            "queries_remaining": self.budget - self.used,
        }
        self.answers[request_id] = answer
        if self.lose:
            return _error(self.lose.pop(0), "x", "scripted after charging")
        return httpx2.Response(200, json=answer)


def _error(status: int, code: str, message: str) -> httpx2.Response:
    return httpx2.Response(status, json={"error": {"code": code, "message": f"{message} {status}"}})


def route_http_to(service: FakeService, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every httpx2.Client created from now on (in this test) sends its requests to ``service``."""
    real_client = httpx2.Client

    def client(**kwargs: object) -> httpx2.Client:
        return real_client(transport=httpx2.MockTransport(service), **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(httpx2, "Client", client)
