"""The HTTP contract in-process (``TestClient(create_app(settings))``): every refusal has the
right status, the JSON error shape and a message naming what was wrong, charges nothing, and
leaves the service answering; plus the happy paths of predict, models and admin."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from fastapi.testclient import TestClient

from mlcore.wire import encode_tensor
from target_service.app import create_app
from target_service.settings import Settings

ADMIN = "test-admin-token"
MODEL = "lenet5-mnist"
MAX_BATCH = 8
MAX_BODY = 64 * 1024
RATE_BURST = 2


def make_app(state_dir: Path, checkpoint_dir: Path, **overrides: Any) -> TestClient:
    settings = Settings(
        admin_token=ADMIN,
        state_dir=state_dir,
        checkpoint_dir=checkpoint_dir,
        models=[MODEL],
        train_missing=False,
        max_batch=MAX_BATCH,
        max_body_bytes=MAX_BODY,
        **overrides,
    )
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def main_app(
    tmp_path_factory: pytest.TempPathFactory, trained_checkpoints: Path
) -> Iterator[TestClient]:
    with make_app(tmp_path_factory.mktemp("api-state"), trained_checkpoints) as client:
        yield client


@pytest.fixture(scope="module")
def limited_app(
    tmp_path_factory: pytest.TempPathFactory, trained_checkpoints: Path
) -> Iterator[TestClient]:
    # 0.05 requests/s: once the burst is spent, no token comes back during a test
    with make_app(
        tmp_path_factory.mktemp("limited-state"),
        trained_checkpoints,
        rate_limit=0.05,
        rate_burst=RATE_BURST,
    ) as client:
        yield client


# -- helpers ------------------------------------------------------------------------------------
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def images(n: int, *, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 1, 28, 28), dtype=np.uint8)


def payload(array: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"inputs": encode_tensor(array).model_dump(), **extra}


def floats(value: float, n: int = 1) -> dict[str, Any]:
    return payload(np.full((n, 1, 28, 28), value, dtype=np.float32))


def raw_inputs(dtype: str, shape: list[int] | None, data: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = {"dtype": dtype, "data": data}
    if shape is not None:
        inputs["shape"] = shape
    return {"inputs": inputs}


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def create_client(http: TestClient, name: str, budget: int) -> tuple[str, str]:
    response = http.post(
        "/v1/admin/clients", json={"name": name, "budget": budget}, headers=ADMIN_HEADERS
    )
    assert response.status_code == 201, response.text
    return response.json()["client_id"], response.json()["api_key"]


def usage(http: TestClient) -> dict[str, int]:
    response = http.get("/v1/admin/clients", headers=ADMIN_HEADERS)
    assert response.status_code == 200, response.text
    return {row["client_id"]: row["queries_used"] for row in response.json()}


@dataclass
class Ctx:
    """One app and fresh clients for one test: ``main`` (budget 100), ``small`` (budget 2),
    ``revoked`` (revoked before use) and ``good`` (the key that checks the service still answers)."""

    http: TestClient
    keys: dict[str, str]
    ids: dict[str, str]

    def predict(
        self,
        body: Any = None,
        *,
        key: str | None = "main",
        model: str = MODEL,
        content: bytes | None = None,
    ) -> Any:
        headers = {} if key is None else bearer(self.keys.get(key, key))
        if content is not None:
            headers["Content-Type"] = "application/json"
            return self.http.post(f"/v1/models/{model}/predict", content=content, headers=headers)
        return self.http.post(f"/v1/models/{model}/predict", json=body, headers=headers)


def make_ctx(http: TestClient, tag: str) -> Ctx:
    ids, keys = {}, {}
    for name, budget in (("main", 100), ("small", 2), ("revoked", 50), ("other", 100)):
        ids[name], keys[name] = create_client(http, f"{tag}-{name}", budget)
    assert http.delete(f"/v1/admin/clients/{ids['revoked']}", headers=ADMIN_HEADERS).json()[
        "revoked"
    ]
    return Ctx(http, keys, ids)


# -- the refusal table ----------------------------------------------------------------------------
class Refusal(NamedTuple):
    id: str
    status: int
    code: str
    mentions: tuple[str, ...]  # the message must name these (the offending value or field)
    send: Callable[[Ctx], Any]
    prepare: Callable[[Ctx], None] | None = None
    app: str = "main"
    good_key: str = "main"  # the key that must still get an answer afterwards


def _spend(key: str, n: int) -> Callable[[Ctx], None]:
    def prepare(ctx: Ctx) -> None:
        for _ in range(n):
            assert ctx.predict(payload(images(1)), key=key).status_code == 200

    return prepare


def _reuse_request_id(ctx: Ctx) -> None:
    assert ctx.predict(payload(images(2, seed=1), request_id="job-7")).status_code == 200


NAN_LISTS = b'{"inputs": {"dtype": "float32", "shape": [1, 1, 1, 2], "data": [[[[NaN, 0.5]]]]}}'

REFUSALS = [
    Refusal("no-key", 401, "missing_api_key", ("Authorization", "Bearer"),
            lambda c: c.predict(payload(images(1)), key=None)),
    Refusal("unknown-key", 401, "unknown_api_key", ("unknown API key",),
            lambda c: c.predict(payload(images(1)), key="mlr_not-a-real-key")),
    Refusal("revoked-key", 401, "revoked_api_key", ("revoked",),
            lambda c: c.predict(payload(images(1)), key="revoked")),
    Refusal("unknown-model", 404, "unknown_model", ("resnet-9000", MODEL),
            lambda c: c.predict(payload(images(1)), model="resnet-9000")),
    Refusal("wrong-rank", 422, "invalid_shape", ("[2, 28, 28]", "[n, 1, 28, 28]"),
            lambda c: c.predict(raw_inputs("uint8", [2, 28, 28], b64(bytes(2 * 784))))),
    Refusal("wrong-channels", 422, "invalid_shape", ("[1, 3, 28, 28]",),
            lambda c: c.predict(raw_inputs("uint8", [1, 3, 28, 28], b64(bytes(3 * 784))))),
    Refusal("wrong-size", 422, "invalid_shape", ("[1, 1, 32, 32]",),
            lambda c: c.predict(raw_inputs("uint8", [1, 1, 32, 32], b64(bytes(1024))))),
    Refusal("wrong-dtype", 422, "invalid_input", ("dtype", "uint8", "float32"),
            lambda c: c.predict(raw_inputs("int16", [1, 1, 28, 28], b64(bytes(2 * 784))))),
    Refusal("length-mismatch", 422, "invalid_input", ("1568", "2352", "[3, 1, 28, 28]"),
            lambda c: c.predict(raw_inputs("uint8", [3, 1, 28, 28], b64(bytes(2 * 784))))),
    Refusal("bad-base64", 422, "invalid_input", ("base64",),
            lambda c: c.predict(raw_inputs("uint8", [1, 1, 28, 28], "not base64!!"))),
    Refusal("missing-shape", 422, "invalid_input", ("shape",),
            lambda c: c.predict(raw_inputs("uint8", None, b64(bytes(784))))),
    Refusal("negative-dim", 422, "invalid_input", ("[-1, 1, 28, 28]",),
            lambda c: c.predict(raw_inputs("uint8", [-1, 1, 28, 28], b64(bytes(784))))),
    Refusal("shape-overflows-int64", 413, "batch_too_large", (str(2**64),),
            lambda c: c.predict(raw_inputs("uint8", [2**32, 2**32, 1, 1], ""))),
    Refusal("zero-size-huge-shape", 422, "invalid_input", ("not a valid array shape",),
            lambda c: c.predict(raw_inputs("uint8", [0, 2**62, 4, 1], ""))),
    Refusal("malformed-json", 422, "malformed_json", ("JSON",),
            lambda c: c.predict(content=b'{"inputs": {"dtype": "uint8", ')),
    Refusal("body-not-object", 422, "invalid_input", ("JSON object",),
            lambda c: c.predict(content=b"[1, 2, 3]")),
    Refusal("unknown-field", 422, "invalid_input", ("logits",),
            lambda c: c.predict(payload(images(1), logits=True))),
    Refusal("nan-base64", 422, "invalid_input", ("NaN",), lambda c: c.predict(floats(np.nan))),
    Refusal("nan-lists", 422, "invalid_input", ("NaN",),
            lambda c: c.predict(content=NAN_LISTS)),
    Refusal("inf", 422, "invalid_input", ("infinity",), lambda c: c.predict(floats(np.inf))),
    Refusal("float-above-1", 422, "invalid_input", ("[0, 1]", "1.5"),
            lambda c: c.predict(floats(1.5))),
    Refusal("float-below-0", 422, "invalid_input", ("[0, 1]", "-0.25"),
            lambda c: c.predict(floats(-0.25))),
    Refusal("uint8-list-out-of-range", 422, "invalid_input", ("0..255",),
            lambda c: c.predict(raw_inputs("uint8", None, [[[[0, 300]]]]))),
    Refusal("empty-batch", 422, "empty_batch", ("empty",),
            lambda c: c.predict(raw_inputs("uint8", [0, 1, 28, 28], ""))),
    Refusal("batch-over-max", 413, "batch_too_large", (f"at most {MAX_BATCH} images", "[9, 1, 28, 28]"),
            lambda c: c.predict(payload(images(MAX_BATCH + 1)))),
    Refusal("body-over-max", 413, "body_too_large", (str(MAX_BODY),),
            lambda c: c.predict(content=b'{"inputs": "' + b"A" * (MAX_BODY + 1) + b'"}')),
    Refusal("batch-over-budget", 402, "budget_exhausted", ("3 image(s)", "remaining budget of 2"),
            lambda c: c.predict(payload(images(3)), key="small")),
    Refusal("budget-spent", 402, "budget_exhausted", ("1 image(s)", "remaining budget of 0"),
            lambda c: c.predict(payload(images(1)), key="small"), prepare=_spend("small", 2)),
    Refusal("client-key-creates-client", 403, "not_admin", ("admin",),
            lambda c: c.http.post("/v1/admin/clients", json={"name": "x", "budget": 10**6},
                                  headers=bearer(c.keys["main"]))),
    Refusal("client-key-lists-clients", 403, "not_admin", ("admin",),
            lambda c: c.http.get("/v1/admin/clients", headers=bearer(c.keys["main"]))),
    Refusal("request-id-reused", 409, "request_id_reused", ("job-7",),
            lambda c: c.predict(payload(images(2, seed=2), request_id="job-7")),
            prepare=_reuse_request_id),
    # item 14: the key is checked before the body is read, so a bad body without a key is a 401
    Refusal("no-key-malformed-json", 401, "missing_api_key", ("Authorization",),
            lambda c: c.predict(content=b"{not json", key=None)),
    Refusal("no-key-body-over-max", 401, "missing_api_key", ("Authorization",),
            lambda c: c.predict(content=b'{"inputs": "' + b"A" * (MAX_BODY + 1) + b'"}', key=None)),
    Refusal("bad-key-malformed-json", 401, "unknown_api_key", ("unknown API key",),
            lambda c: c.predict(content=b"{not json", key="mlr_not-a-real-key")),
    Refusal("client-key-bad-admin-body", 403, "not_admin", ("admin",),
            lambda c: c.http.post("/v1/admin/clients", content=b"{not json",
                                  headers=bearer(c.keys["main"]))),
    # item 15: strict types, nothing coerced
    Refusal("shape-of-strings", 422, "invalid_input", ("inputs.shape.0", "integer"),
            lambda c: c.predict(raw_inputs("uint8", ["1", 1, 28, 28], b64(bytes(784))))),
    Refusal("shape-of-booleans", 422, "invalid_input", ("inputs.shape.0", "integer"),
            lambda c: c.predict(raw_inputs("uint8", [True, True, 28, 28], b64(bytes(784))))),
    Refusal("shape-of-floats", 422, "invalid_input", ("inputs.shape.0", "integer"),
            lambda c: c.predict(raw_inputs("uint8", [1.0, 1, 28, 28], b64(bytes(784))))),
    Refusal("uint8-list-holding-a-string", 422, "invalid_input", ("no strings or booleans",),
            lambda c: c.predict(raw_inputs("uint8", None, [[[[0] * 27 + ["255"]] * 28]]))),
    Refusal("uint8-list-holding-true", 422, "invalid_input", ("no strings or booleans",),
            lambda c: c.predict(raw_inputs("uint8", None, [[[[0] * 27 + [True]] * 28]]))),
    Refusal("base64-data-not-a-string", 422, "invalid_input", ("inputs.data",),
            lambda c: c.predict(raw_inputs("uint8", [1, 1, 28, 28], 12345))),
    Refusal("request-id-not-a-string", 422, "invalid_input", ("request_id",),
            lambda c: c.predict(payload(images(1), request_id=7))),
    # item 16: the framework's own errors, in the one error shape
    Refusal("undecodable-body", 400, "undecodable_body", ("UTF-8",),
            lambda c: c.predict(content=b'{"inputs": "\xff\xfe"}')),
    Refusal("nested-too-deep", 400, "too_deeply_nested", ("nested too deeply",),
            lambda c: c.predict(content=b'{"inputs": ' + b"[" * 20000 + b"]" * 20000 + b"}")),
    Refusal("gzip-body", 400, "unsupported_content_encoding", ("gzip",),
            lambda c: c.http.post(f"/v1/models/{MODEL}/predict", content=gzip.compress(b"{}"),
                                  headers={**bearer(c.keys["main"]), "Content-Encoding": "gzip"})),
    Refusal("wrong-method", 405, "method_not_allowed", ("Method Not Allowed",),
            lambda c: c.http.get(f"/v1/models/{MODEL}/predict", headers=bearer(c.keys["main"]))),
    # item 18: what a client sent is quoted, at most 100 characters of it
    Refusal("long-model-name", 404, "unknown_model", ("(5002 characters)",),
            lambda c: c.predict(payload(images(1)), model="m" * 5000)),
    Refusal("long-unknown-field", 422, "invalid_input", ("Extra inputs", "characters)"),
            lambda c: c.predict(payload(images(1), **{"x" * 5000: 1}))),
    Refusal("rate-limited", 429, "rate_limited", ("requests/s",),
            lambda c: c.predict(payload(images(1))), prepare=_spend("main", RATE_BURST),
            app="limited", good_key="other"),
]  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS, ids=[case.id for case in REFUSALS])
def test_refusal_is_explained_and_free(case: Refusal, request: pytest.FixtureRequest) -> None:
    http: TestClient = request.getfixturevalue(f"{case.app}_app")
    ctx = make_ctx(http, case.id)
    if case.prepare is not None:
        case.prepare(ctx)
    before = usage(http)

    response = case.send(ctx)

    assert response.status_code == case.status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == case.code
    for needle in case.mentions:
        assert needle in body["error"]["message"], (needle, body["error"]["message"])
    assert usage(http) == before, "a refused request must not charge any budget"

    good = ctx.predict(payload(images(1, seed=3)), key=case.good_key)
    assert good.status_code == 200, good.text
    assert len(good.json()["labels"]) == 1
    assert usage(http)[ctx.ids[case.good_key]] == before[ctx.ids[case.good_key]] + 1


# -- happy paths ------------------------------------------------------------------------------------
def test_predict_charges_one_query_per_image(main_app: TestClient) -> None:
    ctx = make_ctx(main_app, "charge")
    first = ctx.predict(payload(images(5)))
    second = ctx.predict(payload(images(3, seed=1)))
    assert first.status_code == second.status_code == 200
    assert first.json()["queries_used"] == 5 and first.json()["queries_remaining"] == 95
    assert second.json()["queries_used"] == 8 and second.json()["queries_remaining"] == 92
    assert first.json()["charged"] == 5 and second.json()["charged"] == 3
    assert set(first.json()) == {"labels", "charged", "queries_used", "queries_remaining"}
    assert all(0 <= label < 10 for label in first.json()["labels"] + second.json()["labels"])
    assert usage(main_app)[ctx.ids["main"]] == 8


def test_uint8_float32_and_nested_lists_get_the_same_labels(main_app: TestClient) -> None:
    ctx = make_ctx(main_app, "encodings")
    x = images(MAX_BATCH, seed=4)
    as_uint8 = ctx.predict(payload(x)).json()["labels"]
    as_float = ctx.predict(payload(x.astype(np.float32) / 255.0)).json()["labels"]
    as_lists = ctx.predict(raw_inputs("uint8", None, x.tolist())).json()["labels"]
    assert as_uint8 == as_float == as_lists
    assert len(as_uint8) == MAX_BATCH


def test_retry_with_request_id_is_answered_from_the_ledger(main_app: TestClient) -> None:
    ctx = make_ctx(main_app, "retry")
    body = payload(images(4, seed=5), request_id="retry-1")
    first = ctx.predict(body)
    again = ctx.predict(body)
    assert first.status_code == again.status_code == 200
    assert first.json()["charged"] == 4 and again.json()["charged"] == 0  # the replay is free
    assert again.json() == {**first.json(), "charged": 0}
    assert usage(main_app)[ctx.ids["main"]] == 4
    # the same request_id is independent between clients
    other = ctx.predict(body, key="other")
    assert other.status_code == 200 and other.json()["queries_used"] == 4


def test_models_health_and_metrics(main_app: TestClient) -> None:
    assert main_app.get("/health").json() == {"status": "ok", "models": [MODEL]}
    models = main_app.get("/v1/models").json()["models"]
    assert models == [
        {
            "name": MODEL,
            "dataset": "mnist-embedded",
            "input_shape": [1, 28, 28],
            "input_dtypes": ["uint8", "float32"],
            "num_classes": 10,
            "output_policy": "label-only",
        }
    ]
    ctx = make_ctx(main_app, "metrics")

    def answered() -> float:
        text = main_app.get("/metrics", headers=ADMIN_HEADERS).text
        match = re.search(r'^mlaas_queries_total\{model="lenet5-mnist"\} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    before = answered()
    assert ctx.predict(payload(images(3))).status_code == 200
    assert ctx.predict(payload(images(3)), key="small").status_code == 402
    assert answered() == before + 3


@pytest.mark.parametrize(
    ("policy", "fields"),
    [
        ("label-only", {"labels"}),
        ("top-k:3", {"labels", "top_k"}),
        ("probabilities:2", {"labels", "probabilities"}),
    ],
    ids=["label-only", "top-k", "probabilities"],
)
def test_output_policy_shapes_the_answer(
    policy: str, fields: set[str], tmp_path: Path, trained_checkpoints: Path
) -> None:
    with make_app(tmp_path, trained_checkpoints, output_policies={MODEL: policy}) as http:
        _, key = create_client(http, "policy", 100)
        response = http.post(
            f"/v1/models/{MODEL}/predict", json=payload(images(6, seed=6)), headers=bearer(key)
        )
        models = http.get("/v1/models").json()["models"]
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == fields | {"charged", "queries_used", "queries_remaining"}
    assert models[0]["output_policy"] == policy
    if "top_k" in body:
        assert [row[0] for row in body["top_k"]] == body["labels"]
        assert all(len(row) == 3 and len(set(row)) == 3 for row in body["top_k"])
    if "probabilities" in body:
        for row, label in zip(body["probabilities"], body["labels"], strict=True):
            assert abs(sum(row) - 1.0) <= 0.05
            assert all(round(p, 2) == p for p in row)
            assert row[label] == max(row)


# -- admin ------------------------------------------------------------------------------------------
def test_admin_create_list_revoke(main_app: TestClient) -> None:
    created = main_app.post(
        "/v1/admin/clients", json={"name": "carol", "budget": 7}, headers=ADMIN_HEADERS
    )
    assert created.status_code == 201
    client_id, api_key = created.json()["client_id"], created.json()["api_key"]
    listed = main_app.get("/v1/admin/clients", headers=ADMIN_HEADERS).text
    assert client_id in listed and api_key not in listed  # the key is shown once
    view = main_app.get(f"/v1/admin/clients/{client_id}", headers=ADMIN_HEADERS).json()
    assert view["budget"] == 7 and view["queries_used"] == 0 and view["queries_remaining"] == 7
    assert view["revoked"] is False
    revoked = main_app.delete(f"/v1/admin/clients/{client_id}", headers=ADMIN_HEADERS)
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    refused = main_app.post(
        f"/v1/models/{MODEL}/predict", json=payload(images(1)), headers=bearer(api_key)
    )
    assert refused.status_code == 401
    missing = main_app.get("/v1/admin/clients/nope", headers=ADMIN_HEADERS)
    assert missing.status_code == 404 and "'nope'" in missing.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "budget": -1}, "budget"),
        ({"name": "", "budget": 1}, "name"),
        ({"name": "x", "budget": 1, "extra": 1}, "extra"),
        ({"name": "x", "budget": True}, "budget"),
        ({"name": "x", "budget": "100"}, "budget"),
        ({"name": "x", "budget": 1.0}, "budget"),
        ({"name": "x", "budget": None}, "budget"),
        ({"name": 5, "budget": 1}, "name"),
        ({"name": "x" * 201, "budget": 1}, "name"),
        ({"name": "two\nlines", "budget": 1}, "printable"),
        ({"name": "bell\x07", "budget": 1}, "printable"),
    ],
    ids=[
        "negative-budget",
        "empty-name",
        "extra-field",
        "budget-true",
        "budget-string",
        "budget-float",
        "budget-null",
        "name-number",
        "name-201-chars",
        "name-newline",
        "name-control-char",
    ],
)
def test_admin_rejects_bad_client(main_app: TestClient, body: dict, field: str) -> None:
    before = main_app.get("/v1/admin/clients", headers=ADMIN_HEADERS).json()
    response = main_app.post("/v1/admin/clients", json=body, headers=ADMIN_HEADERS)
    assert response.status_code == 422
    assert field in response.json()["error"]["message"]
    assert main_app.get("/v1/admin/clients", headers=ADMIN_HEADERS).json() == before


def test_admin_api_is_off_without_a_token(tmp_path: Path, trained_checkpoints: Path) -> None:
    settings = Settings(
        admin_token=None,
        state_dir=tmp_path,
        checkpoint_dir=trained_checkpoints,
        models=[MODEL],
        train_missing=False,
    )
    with TestClient(create_app(settings)) as http:
        response = http.post(
            "/v1/admin/clients", json={"name": "x", "budget": 1}, headers=bearer("anything")
        )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "admin_disabled"
    assert "TARGET_ADMIN_TOKEN" in response.json()["error"]["message"]


def test_error_bodies_parse_as_the_wire_schema(main_app: TestClient) -> None:
    from mlcore.wire import ErrorResponse

    body = main_app.post(f"/v1/models/{MODEL}/predict", json=payload(images(1))).json()
    assert ErrorResponse.model_validate(body).error.code == "missing_api_key"
    assert json.loads(json.dumps(body)) == body


def test_admin_accepts_a_200_character_printable_name(main_app: TestClient) -> None:
    name = "Zoë's team (ünïcode ok) " + "x" * 176
    assert len(name) == 200
    response = main_app.post(
        "/v1/admin/clients", json={"name": name, "budget": 1}, headers=ADMIN_HEADERS
    )
    assert response.status_code == 201, response.text
    assert response.json()["name"] == name


# -- item 13: stored answers and the 500 message ------------------------------------------------------
def test_stored_answer_is_replayed_after_an_output_policy_change(
    tmp_path: Path, trained_checkpoints: Path
) -> None:
    body = payload(images(3, seed=9), request_id="before-the-change")
    with make_app(tmp_path, trained_checkpoints) as http:
        client_id, key = create_client(http, "policy-change", 100)
        first = http.post(f"/v1/models/{MODEL}/predict", json=body, headers=bearer(key))
    assert first.status_code == 200 and "top_k" not in first.json()
    with make_app(tmp_path, trained_checkpoints, output_policies={MODEL: "top-k:3"}) as http:
        again = http.post(f"/v1/models/{MODEL}/predict", json=body, headers=bearer(key))
        fresh = http.post(
            f"/v1/models/{MODEL}/predict", json=payload(images(1)), headers=bearer(key)
        )
        used = usage(http)[client_id]
    assert again.status_code == 200, again.text
    assert again.json() == {**first.json(), "charged": 0}  # the answer sold, as it was sold
    assert fresh.status_code == 200 and len(fresh.json()["top_k"][0]) == 3
    assert used == 3 + 1


def test_a_500_after_the_charge_does_not_say_nothing_was_charged(
    main_app: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = make_ctx(main_app, "fails-after-charge")
    service = main_app.app.state.service  # type: ignore[attr-defined]
    real_predict = service.predict

    def charge_then_fail(*args: Any, **kwargs: Any) -> Any:
        real_predict(*args, **kwargs)
        raise RuntimeError("fails after the charge")

    body = payload(images(2, seed=11), request_id="charged-then-500")
    http = TestClient(main_app.app, raise_server_exceptions=False)  # no `with`: one lifespan
    monkeypatch.setattr(service, "predict", charge_then_fail)
    failed = http.post(f"/v1/models/{MODEL}/predict", json=body, headers=bearer(ctx.keys["main"]))
    monkeypatch.undo()
    retried = ctx.predict(body)
    assert failed.status_code == 500
    message = failed.json()["error"]["message"]
    assert "nothing was charged" not in message
    assert "may have been charged" in message and "request_id" in message
    assert usage(main_app)[ctx.ids["main"]] == 2  # it was charged...
    assert retried.status_code == 200 and retried.json()["queries_used"] == 2  # ...once


def test_a_500_before_the_charge_says_nothing_was_charged(
    main_app: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = make_ctx(main_app, "fails-before-charge")
    service = main_app.app.state.service  # type: ignore[attr-defined]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the key lookup fails")

    http = TestClient(main_app.app, raise_server_exceptions=False)  # no `with`: one lifespan
    monkeypatch.setattr(service.store, "authenticate", broken)
    failed = http.post(
        f"/v1/models/{MODEL}/predict", json=payload(images(1)), headers=bearer(ctx.keys["main"])
    )
    assert failed.status_code == 500
    assert failed.json() == {
        "error": {"code": "internal_error", "message": "internal error; nothing was charged"}
    }


# -- item 14: the key is checked before a byte of the body is read ----------------------------------
class CountingReceive:
    """An ASGI ``receive`` that counts how often the app asked for the body."""

    def __init__(self, body: bytes, *, stall: bool = False) -> None:
        self.body, self.stall, self.calls = body, stall, 0

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.stall:  # a client that never sends its body
            await asyncio.sleep(3600)
        return {"type": "http.request", "body": self.body, "more_body": False}


def call_asgi(
    http: TestClient, method: str, path: str, headers: dict[str, str], receive: CountingReceive
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Call the app directly (no test client in between); returns status, headers, JSON body."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "server": ("testserver", 80), "client": ("testclient", 50000),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()], "state": {},
    }  # fmt: skip
    # a deadline of our own: without the service's, a stalled body would hang the test
    asyncio.run(asyncio.wait_for(http.app(scope, receive, send), timeout=10))  # type: ignore[arg-type]
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers_out = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers_out, json.loads(body)


@pytest.mark.parametrize(
    ("path", "key", "status", "code"),
    [
        (f"/v1/models/{MODEL}/predict", None, 401, "missing_api_key"),
        (f"/v1/models/{MODEL}/predict", "mlr_not-a-real-key", 401, "unknown_api_key"),
        ("/v1/admin/clients", None, 401, "missing_api_key"),
        ("/v1/admin/clients", "not-the-admin-token", 403, "not_admin"),
    ],
    ids=["predict-no-key", "predict-bad-key", "admin-no-token", "admin-bad-token"],
)
def test_a_refused_key_reads_no_body(
    main_app: TestClient, path: str, key: str | None, status: int, code: str
) -> None:
    headers = {"content-type": "application/json", "content-length": str(MAX_BODY * 4)}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    receive = CountingReceive(b"{not json" + b" " * (MAX_BODY * 4 - 9))
    got_status, _, body = call_asgi(main_app, "POST", path, headers, receive)
    assert (got_status, body["error"]["code"]) == (status, code)
    assert receive.calls == 0, "the body was read before the key was checked"


def test_a_body_without_a_length_gets_411(main_app: TestClient) -> None:
    ctx = make_ctx(main_app, "length")
    headers = {"authorization": f"Bearer {ctx.keys['main']}"}
    status, _, body = call_asgi(
        main_app, "POST", f"/v1/models/{MODEL}/predict", headers, CountingReceive(b"{}")
    )
    assert status == 411 and body["error"]["code"] == "length_required"
    assert "Content-Length" in body["error"]["message"]


def test_a_body_that_does_not_arrive_gets_408(tmp_path: Path, trained_checkpoints: Path) -> None:
    with make_app(tmp_path, trained_checkpoints, body_timeout=0.3) as http:
        _, key = create_client(http, "slow", 10)
        headers = {"authorization": f"Bearer {key}", "content-length": "100"}
        status, out_headers, body = call_asgi(
            http, "POST", f"/v1/models/{MODEL}/predict", headers, CountingReceive(b"", stall=True)
        )
    assert status == 408 and body["error"]["code"] == "body_timeout"
    assert "0.3 s" in body["error"]["message"]
    assert out_headers["connection"] == "close"


# -- item 16: every error is documented, in one shape ------------------------------------------------
def test_method_not_allowed_names_the_allowed_methods(main_app: TestClient) -> None:
    response = main_app.put("/v1/admin/alarms", headers=ADMIN_HEADERS)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_openapi_documents_every_error_with_the_error_schema(main_app: TestClient) -> None:
    spec = main_app.get("/openapi.json").json()
    error_ref = "#/components/schemas/ErrorResponse"
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    operations = [
        (path, method, operation)
        for path, methods in spec["paths"].items()
        for method, operation in methods.items()
    ]
    assert len(operations) >= 9
    for path, method, operation in operations:
        responses = operation["responses"]
        expected = {"405", "500"}
        if method in ("post", "put", "patch"):
            expected |= {"400", "408", "411", "413", "422"}
        if path.startswith("/v1/admin") or path == "/metrics" or path.endswith("/predict"):
            expected |= {"401", "403"}
        if "{" in path:
            expected |= {"404", "422"}
        assert expected <= set(responses), (path, method, sorted(responses))
        for status, response in responses.items():
            if int(status) >= 400:
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": error_ref}, (path, method, status)
    tensor = spec["components"]["schemas"]["EncodedTensor"]
    assert tensor["then"] == {"required": ["shape"]}  # shape is required with base64 data


# -- item 18: /metrics is the operator's --------------------------------------------------------------
def test_metrics_need_the_admin_token(main_app: TestClient) -> None:
    ctx = make_ctx(main_app, "metrics-access")
    assert main_app.get("/metrics").json()["error"]["code"] == "missing_api_key"
    as_client = main_app.get("/metrics", headers=bearer(ctx.keys["main"]))
    assert as_client.status_code == 403 and as_client.json()["error"]["code"] == "not_admin"
    assert main_app.get("/metrics", headers=ADMIN_HEADERS).status_code == 200
    assert main_app.get("/health").status_code == 200  # still public
    assert main_app.get("/v1/models").status_code == 200


def test_metrics_can_be_made_public(tmp_path: Path, trained_checkpoints: Path) -> None:
    with make_app(tmp_path, trained_checkpoints, metrics_public=True) as http:
        response = http.get("/metrics")
    assert response.status_code == 200 and "mlaas_queries" in response.text


def test_serve_refuses_a_short_admin_token(tmp_path: Path) -> None:
    env = {**os.environ, "TARGET_ADMIN_TOKEN": "fifteen-chars!!", "TARGET_STATE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "target_service.cli", "serve", "--port", "1"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "TARGET_ADMIN_TOKEN must be at least 16 characters, got 15" in done.stdout + done.stderr
    assert "fifteen-chars!!" not in done.stdout + done.stderr
    assert not (tmp_path / "state.sqlite3").exists()
