"""HttpOracle against a mock transport: batching, retries with the same request_id, clean stops
at 402/403, the answer cache; and LocalOracle."""

from __future__ import annotations

from pathlib import Path

import httpx2
import numpy as np
import pytest
import torch

from attacker.oracle import (
    NOT_BOUGHT,
    REJECTED,
    Blocked,
    BudgetExhausted,
    HttpOracle,
    LocalOracle,
    OracleRejected,
    OracleUnavailable,
    buy,
)
from mlcore.architectures import build_model
from mlcore.wire import EncodedTensor, decode_tensor
from tests.attacker.fakes import FakeService


def oracle_for(
    service: FakeService, tmp_path: Path | None = None, *, key: str = "key", **kwargs
) -> HttpOracle:
    client = httpx2.Client(transport=httpx2.MockTransport(service), base_url="http://target")
    cache = tmp_path / "cache.sqlite3" if tmp_path is not None else None
    return HttpOracle(
        "http://target", key, "m", client=client, cache_path=cache, backoff=0.0, **kwargs
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
    assert service.used == 5 and oracle.meter.paid == 5


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
    assert second.used == 5 and oracle.meter.from_cache == 15 and oracle.meter.paid == 5


def test_bad_settings_name_the_value() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        HttpOracle("http://x", "k", "m", batch_size=0)


def test_local_oracle_counts_queries_and_answers_like_the_model() -> None:
    model = build_model("dnn5")
    oracle = LocalOracle(model)
    x = np.random.default_rng(0).integers(0, 256, size=(6, 1, 28, 28), dtype=np.uint8)
    labels = oracle.predict_labels(x)
    assert labels.shape == (6,) and oracle.meter.paid == 6
    expected = model(torch.from_numpy(x).float() / 255).argmax(1).numpy()
    assert labels.tolist() == expected.tolist()


# -- meters: what the server charged, replays and cache hits apart ----------------------------------
def test_the_meter_takes_the_servers_charged_figures() -> None:
    service = FakeService()
    first = oracle_for(service)
    first.predict_labels(images(12))
    assert first.meter.report() == {
        "queries_paid": 12, "queries_replayed": 0, "queries_from_cache": 0, "queries_rejected": 0
    }  # fmt: skip
    # A new run without a cache sends the same batches: the server replays them, charged 0.
    again = oracle_for(service)
    again.predict_labels(images(12))
    assert again.meter.report() == {
        "queries_paid": 0, "queries_replayed": 12, "queries_from_cache": 0, "queries_rejected": 0
    }  # fmt: skip
    assert service.used == 12


def test_a_lost_answer_is_paid_once_and_not_called_a_replay() -> None:
    service = FakeService(lose=[503])  # charged, then the answer is lost
    oracle = oracle_for(service)
    oracle.predict_labels(images(5))
    oracle.predict_labels(images(8)[5:])
    assert service.used == 8
    assert (oracle.meter.paid, oracle.meter.replayed) == (8, 0)


def test_a_retried_replay_of_an_earlier_runs_charge_is_not_paid() -> None:
    service = FakeService()
    oracle_for(service).predict_labels(images(5))  # an earlier run paid for this batch
    service.failures = [503]
    later = oracle_for(service)
    later.predict_labels(images(10)[5:])  # this run pays for a new batch first
    later.predict_labels(images(5))  # then a retried request that the earlier run paid for
    assert (later.meter.paid, later.meter.replayed) == (5, 5)


def test_an_answer_without_charged_is_rejected() -> None:
    def old_server(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, json={"labels": [1], "queries_used": 1, "queries_remaining": 9})

    client = httpx2.Client(transport=httpx2.MockTransport(old_server), base_url="http://t")
    with pytest.raises(OracleRejected, match="lacks the charged"):
        HttpOracle("http://t", "k", "m", client=client).predict_labels(images(1))


# -- the answer cache is per account unless shared ----------------------------------------------------
def test_the_cache_is_scoped_to_the_api_key(tmp_path: Path) -> None:
    service = FakeService()
    oracle_for(service, tmp_path, key="alice-secret-key").predict_labels(images(15))
    bob = oracle_for(service, tmp_path, key="bob-key")
    bob.predict_labels(images(15))
    assert bob.meter.from_cache == 0 and bob.meter.paid == 15 and service.used == 30
    assert b"alice-secret-key" not in (tmp_path / "cache.sqlite3").read_bytes()


def test_a_shared_cache_reuses_labels_another_account_bought(tmp_path: Path) -> None:
    service = FakeService()
    oracle_for(service, tmp_path, key="alice", shared_cache=True).predict_labels(images(15))
    sybil = oracle_for(service, tmp_path, key="sybil", shared_cache=True)
    assert sybil.predict_labels(images(15)).tolist() == [i % 10 for i in range(15)]
    assert sybil.meter.from_cache == 15 and sybil.meter.paid == 0 and service.used == 15


def test_a_request_nonce_makes_a_new_session_pay_again() -> None:
    service = FakeService()
    for nonce in ("run-1", "run-2"):
        oracle_for(service, request_nonce=nonce).predict_labels(images(6))
    assert service.used == 12
    assert len({r["request_id"] for r in service.requests}) == 2


# -- buy: the one budget / stop behaviour of every attack -------------------------------------------
def test_buy_spends_the_rest_of_the_budget_after_a_402() -> None:
    service = FakeService(budget=37)
    purchase = buy(oracle_for(service, batch_size=10), images(60))
    assert purchase.stopped_by == "budget" and "no budget" in (purchase.message or "")
    assert purchase.bought.sum() == 37 == service.used
    assert purchase.labels[:37].tolist() == [i % 10 for i in range(37)]


def test_buy_keeps_the_labels_bought_before_a_403() -> None:
    service = FakeService(block_after=20)
    purchase = buy(oracle_for(service, batch_size=10), images(50))
    assert purchase.stopped_by == "blocked"
    assert purchase.bought.tolist() == [True] * 20 + [False] * 30


def test_buy_without_a_refusal_says_nothing_stopped_it() -> None:
    purchase = buy(oracle_for(FakeService()), images(7))
    assert purchase.stopped_by is None and purchase.bought.all()


# -- an input defence in framework mode: refused images are charged and have no label ----------------
def odd(image: np.ndarray) -> bool:
    """The fake defence refuses images whose first pixel is odd."""
    return int(image.reshape(-1)[0]) % 2 == 1


def test_a_rejected_image_is_paid_and_marked_rejected_not_unbought(tmp_path: Path) -> None:
    service = FakeService(reject=odd)
    oracle = oracle_for(service, tmp_path, batch_size=5)
    labels = oracle.predict_labels(images(12))
    assert labels.tolist() == [REJECTED if i % 2 else i % 10 for i in range(12)]
    assert REJECTED != NOT_BOUGHT
    assert oracle.meter.report() == {
        "queries_paid": 12, "queries_replayed": 0, "queries_from_cache": 0, "queries_rejected": 6
    }  # fmt: skip
    assert service.used == 12 and service.rejected == 6
    # A re-run reads the refusals from the cache too: asking again would pay again.
    again = oracle_for(service, tmp_path, batch_size=5)
    assert again.predict_labels(images(12)).tolist() == labels.tolist()
    assert again.meter.report() == {
        "queries_paid": 0, "queries_replayed": 0, "queries_from_cache": 12, "queries_rejected": 6
    }  # fmt: skip
    assert service.used == 12


def test_buy_after_a_402_does_not_buy_a_refused_image_again() -> None:
    service = FakeService(budget=15, reject=odd)
    purchase = buy(oracle_for(service, batch_size=10), images(40))
    assert purchase.stopped_by == "budget" and service.used == 15
    assert purchase.rejected.sum() == 7 and purchase.bought.sum() == 8
    assert (purchase.labels[15:] == NOT_BOUGHT).all()


@pytest.mark.parametrize(
    "answer,message",
    [
        ({"labels": [1, None], "rejected": []}, "rejected indices .* do not match"),
        ({"labels": [1, None]}, "rejected indices .* do not match"),
        ({"labels": [1, 2], "rejected": [1]}, "rejected indices .* do not match"),
        ({"labels": [1, None], "rejected": [1, 1]}, "rejected indices .* do not match"),
        ({"labels": [1, -2], "rejected": []}, "classes >= 0 or null"),
        ({"labels": [1], "rejected": []}, "no list of 2 labels"),
    ],
)
def test_an_answer_whose_rejections_do_not_add_up_is_refused(answer: dict, message: str) -> None:
    def server(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(
            200, json={**answer, "charged": 2, "queries_used": 2, "queries_remaining": 8}
        )

    client = httpx2.Client(transport=httpx2.MockTransport(server), base_url="http://t")
    oracle = HttpOracle("http://t", "key", "m", client=client, backoff=0.0)
    with pytest.raises(OracleRejected, match=message):
        oracle.predict_labels(images(2))
