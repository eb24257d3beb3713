"""The HTTP contract in-process (``TestClient(create_app(settings))``): every refusal has the
right status, the JSON error shape and a message naming what was wrong, charges nothing, and
leaves the service answering; plus the happy paths of predict, models and admin."""

from __future__ import annotations

import base64
import json
import re
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
        text = main_app.get("/metrics").text
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
    ],
    ids=["negative-budget", "empty-name", "extra-field"],
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
