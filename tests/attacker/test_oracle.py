"""HttpOracle against a mock transport: batching, retries with the same request_id, clean stops
at 402/403, the answer cache; and LocalOracle."""

from __future__ import annotations

import json
from pathlib import Path

import httpx2
import numpy as np
import pytest
import torch

from attacker.oracle import (
    Blocked,
    BudgetExhausted,
    HttpOracle,
    LocalOracle,
    OracleRejected,
    OracleUnavailable,
)
from mlcore.architectures import build_model
from mlcore.wire import EncodedTensor, decode_tensor


class FakeService:
    """Labels each image with its first pixel mod 10; scripted failures before answering."""

    def __init__(self, *, budget: int = 10_000, failures: list[int] | None = None) -> None:
        self.budget, self.used = budget, 0
        self.failures = list(failures or [])  # status codes to return before the next answer
        self.requests: list[dict] = []
        self.charged_ids: set[str] = set()

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        self.requests.append(body)
        if self.failures:
            status = self.failures.pop(0)
            return httpx2.Response(
                status, json={"error": {"code": "x", "message": f"scripted {status}"}}
            )
        images = decode_tensor(EncodedTensor(**body["inputs"]))
        if body["request_id"] not in self.charged_ids:
            if self.used + len(images) > self.budget:
                return httpx2.Response(
                    402, json={"error": {"code": "budget_exhausted", "message": "no budget"}}
                )
            self.used += len(images)
            self.charged_ids.add(body["request_id"])
        labels = [int(image.reshape(-1)[0]) % 10 for image in images]
        return httpx2.Response(
            200,
            json={
                "labels": labels,
                "queries_used": self.used,
                "queries_remaining": self.budget - self.used,
            },
        )


def oracle_for(service: FakeService, tmp_path: Path | None = None, **kwargs) -> HttpOracle:
    client = httpx2.Client(transport=httpx2.MockTransport(service), base_url="http://target")
    cache = tmp_path / "cache.sqlite3" if tmp_path is not None else None
    return HttpOracle(
        "http://target", "key", "m", client=client, cache_path=cache, backoff=0.0, **kwargs
    )


def images(n: int) -> np.ndarray:
    x = np.zeros((n, 1, 4, 4), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n)
    return x


def test_batches_and_keeps_order() -> None:
    service = FakeService()
    labels = oracle_for(service, batch_size=7).predict_labels(images(20))
    assert labels.tolist() == [i % 10 for i in range(20)]
    assert [len(decode_tensor(EncodedTensor(**r["inputs"]))) for r in service.requests] == [7, 7, 6]


@pytest.mark.parametrize(
    "failures", [[429], [500, 503], [502, 429, 500]], ids=["429", "5xx", "mixed"]
)
def test_retries_reuse_the_request_id_and_pay_once(failures: list[int]) -> None:
    service = FakeService(failures=failures)
    oracle = oracle_for(service)
    assert oracle.predict_labels(images(5)).tolist() == [0, 1, 2, 3, 4]
    assert len({r["request_id"] for r in service.requests}) == 1
    assert len(service.requests) == len(failures) + 1
    assert service.used == 5 and oracle.queries_bought == 5


def test_gives_up_after_max_retries() -> None:
    oracle = oracle_for(FakeService(failures=[503] * 10), max_retries=2)
    with pytest.raises(OracleUnavailable, match="gave up after 3 attempts; last: HTTP 503"):
        oracle.predict_labels(images(2))


def test_budget_exhausted_keeps_what_was_bought(tmp_path: Path) -> None:
    service = FakeService(budget=12)
    with pytest.raises(BudgetExhausted) as caught:
        oracle_for(service, tmp_path, batch_size=5).predict_labels(images(20))
    assert caught.value.labels[:10].tolist() == list(range(10))
    assert (caught.value.labels[10:] == -1).all()
    assert service.used == 10


@pytest.mark.parametrize(
    ("status", "error"), [(403, Blocked), (401, OracleRejected), (422, OracleRejected)]
)
def test_refusals_stop_cleanly_without_retrying(status: int, error: type) -> None:
    service = FakeService(failures=[status])
    with pytest.raises(error, match=f"scripted {status}"):
        oracle_for(service).predict_labels(images(3))
    assert len(service.requests) == 1


def test_a_second_run_reuses_the_cache_and_buys_nothing(tmp_path: Path) -> None:
    first = FakeService()
    assert oracle_for(first, tmp_path).predict_labels(images(15)).tolist() == [
        i % 10 for i in range(15)
    ]
    second = FakeService()
    oracle = oracle_for(second, tmp_path)
    assert oracle.predict_labels(images(20)).tolist() == [i % 10 for i in range(20)]
    assert second.used == 5 and oracle.cache_hits == 15


def test_bad_settings_name_the_value() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        HttpOracle("http://x", "k", "m", batch_size=0)


def test_local_oracle_counts_queries_and_answers_like_the_model() -> None:
    model = build_model("dnn5")
    oracle = LocalOracle(model)
    x = np.random.default_rng(0).integers(0, 256, size=(6, 1, 28, 28), dtype=np.uint8)
    labels = oracle.predict_labels(x)
    assert labels.shape == (6,) and oracle.queries == 6
    expected = model(torch.from_numpy(x).float() / 255).argmax(1).numpy()
    assert labels.tolist() == expected.tolist()
