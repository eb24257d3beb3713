"""Input defences in the service (issue 9, item 3), in-process with a controllable pair.

``FakePair`` stands in for the sanitised pair so every decision is known in advance: the parent
is the session's trained LeNet-5, the "sanitised" logits are the parent's rolled by one class
(so the sanitised label is the parent's + 1 mod 10), and an image is flagged when its mean
intensity is above 0.5 (its score). The real pair is exercised in ``test_input_defense_pairs.py``
and end to end in ``tests/e2e/test_input_defense_e2e.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError
from torch import nn

from mlcore.checkpoints import load_checkpoint
from mlcore.client import read_prediction
from mlcore.training import predict_logits
from target_service import screening
from target_service.settings import Settings, describe_settings_error
from target_service.testing import LiveServer, ServerStartError
from tests.target_service.test_api import ADMIN_HEADERS, MODEL, bearer, make_app, payload

FRAMEWORK = {"kind": "kl-sanitized", "mode": "framework", "method": "self", "threshold": 0.9}


@dataclass
class FakeAssessment:
    parent_logits: torch.Tensor
    sanitized_logits: torch.Tensor
    scores: np.ndarray
    flagged: np.ndarray


@dataclass
class FakePair:
    parent: nn.Module
    method: str = "self"
    threshold: float = 0.9
    score_kind: str = "kl"
    pass_rate: float = 0.98
    score_threshold: float = 0.5
    calls: list[int] = field(default_factory=list)

    def assess(self, x: torch.Tensor) -> FakeAssessment:
        self.calls.append(len(x))
        parent = predict_logits(self.parent, x)
        scores = x.double().mean(dim=(1, 2, 3)).numpy()
        return FakeAssessment(parent, parent.roll(1, dims=1), scores, scores > self.score_threshold)


@pytest.fixture
def pairs(monkeypatch: pytest.MonkeyPatch, trained_checkpoints: Path) -> list[FakePair]:
    """Every pair the app loads is a FakePair over the trained checkpoint (listed here)."""
    loaded: list[FakePair] = []

    def fake_load_pair(model: str, checkpoint_dir: Path, spec: Any, **_: Any) -> FakePair:
        loaded.append(FakePair(load_checkpoint(checkpoint_dir / f"{model}.pt").model))
        return loaded[-1]

    monkeypatch.setattr(screening, "load_pair", fake_load_pair)
    return loaded


def app(tmp_path: Path, checkpoints: Path, spec: dict[str, Any], **overrides: Any) -> TestClient:
    return make_app(
        tmp_path / "state",
        checkpoints,
        input_defenses={MODEL: spec},
        detectors={MODEL: {"prada": {}}},
        **overrides,
    )


@pytest.fixture
def http(tmp_path: Path, trained_checkpoints: Path, pairs: list[FakePair]) -> Iterator[TestClient]:
    with app(tmp_path, trained_checkpoints, FRAMEWORK) as client:
        yield client


def new_client(http: TestClient, budget: int = 100) -> tuple[str, str]:
    response = http.post(
        "/v1/admin/clients", json={"name": "c", "budget": budget}, headers=ADMIN_HEADERS
    )
    assert response.status_code == 201, response.text
    return response.json()["client_id"], response.json()["api_key"]


def mixed_batch() -> np.ndarray:
    """Six real test digits (mean intensity about 0.13: passed) with bright ones (flagged) at
    indices 1 and 4."""
    from mlcore.datasets import load_dataset

    x = load_dataset("mnist-embedded:test").images[:6].numpy().copy()
    x[[1, 4]] = 230
    return x


def parent_labels(pairs: list[FakePair], x: np.ndarray) -> list[int]:
    return predict_logits(pairs[0].parent, torch.from_numpy(x)).argmax(dim=1).tolist()


def predict(http: TestClient, key: str, x: np.ndarray, **extra: Any) -> Any:
    return http.post(f"/v1/models/{MODEL}/predict", json=payload(x, **extra), headers=bearer(key))


def admin_view(http: TestClient, client_id: str) -> dict[str, Any]:
    response = http.get(f"/v1/admin/clients/{client_id}", headers=ADMIN_HEADERS)
    assert response.status_code == 200, response.text
    return response.json()


# -- modes --------------------------------------------------------------------------------------
def test_framework_answers_null_for_rejected_images_charges_them_and_replays_unchanged(
    http: TestClient, pairs: list[FakePair]
) -> None:
    client_id, key = new_client(http)
    x = mixed_batch()
    response = predict(http, key, x, request_id="r1")

    assert response.status_code == 200, response.text
    body = response.json()
    sanitized = [(label + 1) % 10 for label in parent_labels(pairs, x)]
    assert body["rejected"] == [1, 4]
    assert body["labels"] == [None if i in (1, 4) else sanitized[i] for i in range(6)]
    assert body["charged"] == 6 and body["queries_used"] == 6  # rejected images are charged
    assert pairs[0].calls == [6]  # one assessment (a forward pass of each model) per batch
    prediction = read_prediction(body)
    assert prediction.rejected == [1, 4] and prediction.labels[1] is None

    replay = predict(http, key, x, request_id="r1")
    assert replay.json() == {**body, "charged": 0}
    assert pairs[0].calls == [6]  # a replay runs no model

    view = admin_view(http, client_id)
    defence = view["input_defenses"][MODEL]
    assert (defence["images"], defence["flagged"], defence["rejected"]) == (6, 2, 2)
    assert defence["kind"] == "kl-sanitized" and defence["mode"] == "framework"
    assert defence["score_threshold"] == 0.5
    assert defence["recent_score_max"] == pytest.approx(230 / 255)
    assert view["queries_used"] == 6
    # the stealing detectors saw every charged image, rejected ones included
    assert view["detectors"]["prada"]["queries_seen"] == 6
    metrics = http.get("/metrics", headers=ADMIN_HEADERS).text
    assert 'mlaas_input_rejected_total{model="lenet5-mnist"} 2.0' in metrics
    assert 'mlaas_input_flagged_total{model="lenet5-mnist"} 2.0' in metrics


@pytest.mark.parametrize(
    ("mode", "answer_shift"), [("log", 0), ("sanitized", 1)], ids=["log", "sanitized"]
)
def test_log_and_sanitized_modes_answer_every_image_and_record_flags(
    tmp_path: Path, trained_checkpoints: Path, pairs: list[FakePair], mode: str, answer_shift: int
) -> None:
    with app(tmp_path, trained_checkpoints, {**FRAMEWORK, "mode": mode}) as http:
        client_id, key = new_client(http)
        x = mixed_batch()
        body = predict(http, key, x).json()

        assert "rejected" not in body  # this defence cannot reject: the plain label-only schema
        assert body["labels"] == [(label + answer_shift) % 10 for label in parent_labels(pairs, x)]
        defence = admin_view(http, client_id)["input_defenses"][MODEL]
        assert (defence["mode"], defence["flagged"], defence["rejected"]) == (mode, 2, 0)


def test_framework_with_top_k_withholds_every_field_of_a_rejected_image(
    tmp_path: Path, trained_checkpoints: Path, pairs: list[FakePair]
) -> None:
    with app(tmp_path, trained_checkpoints, FRAMEWORK, output_policies={MODEL: "top-k:3"}) as http:
        _, key = new_client(http)
        body = predict(http, key, mixed_batch()).json()

    assert body["rejected"] == [1, 4]
    assert body["top_k"][1] is None and body["top_k"][4] is None
    assert all(len(body["top_k"][i]) == 3 for i in (0, 2, 3, 5))
    assert [row[0] if row else None for row in body["top_k"]] == body["labels"]


# -- the rejected-share alarm -------------------------------------------------------------------
def test_rejected_share_alarm_fires_blocks_and_survives_a_restart(
    tmp_path: Path, trained_checkpoints: Path, pairs: list[FakePair]
) -> None:
    spec = {**FRAMEWORK, "alarm_window": 10, "alarm_share": 0.3}  # 3 of the last 10 images
    policies = {"alarm_policies": {MODEL: "block"}}
    with app(tmp_path, trained_checkpoints, spec, **policies) as http:
        client_id, key = new_client(http)
        _, benign_key = new_client(http)
        x = mixed_batch()
        assert predict(http, key, x).status_code == 200  # 2 rejected: no alarm yet
        assert admin_view(http, client_id)["input_defenses"][MODEL]["first_alarm_at"] is None
        assert predict(http, key, x).status_code == 200  # the 8th image is the 3rd rejected
        refused = predict(http, key, x)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "blocked"
        assert "rejected" in refused.json()["error"]["message"]
        view = admin_view(http, client_id)
        alarms = http.get("/v1/admin/alarms", headers=ADMIN_HEADERS).json()
        benign = predict(http, benign_key, x[[0, 2, 3]])
        assert benign.status_code == 200  # the others are not blocked

    defence = view["input_defenses"][MODEL]
    assert view["queries_used"] == 12  # the refused request was not charged
    assert view["blocked_on"] == [MODEL]
    assert defence["first_alarm_at"] == 8
    assert (defence["rejected"], defence["recent_flagged"], defence["statistic"]) == (4, 3, 0.3)
    assert [(a["client_id"], a["detector"], a["query_index"]) for a in alarms] == [
        (client_id, "kl-sanitized", 8)
    ]

    with app(tmp_path, trained_checkpoints, spec, **policies) as http:  # a restart
        assert predict(http, key, x[[0]]).status_code == 403
        assert admin_view(http, client_id)["input_defenses"][MODEL] == defence
        assert http.get("/v1/admin/alarms", headers=ADMIN_HEADERS).json() == alarms


def test_log_policy_records_the_alarm_and_keeps_answering(
    http: TestClient, pairs: list[FakePair]
) -> None:
    client_id, key = new_client(http)
    bright = np.full((8, 1, 28, 28), 200, dtype=np.uint8)  # the test app's largest batch
    for _ in range(4):
        assert predict(http, key, bright).status_code == 200
    view = admin_view(http, client_id)
    # defaults at a 98% pass rate: 12 flagged among the last 100 images
    assert view["input_defenses"][MODEL]["first_alarm_at"] == 12
    assert view["input_defenses"][MODEL]["alarm_window"] == 100
    assert view["input_defenses"][MODEL]["threshold"] == 0.12
    assert view["blocked_on"] == []


# -- settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({**FRAMEWORK, "kind": "kl"}, "TARGET_INPUT_DEFENSES.lenet5-mnist.kind: Input should be"),
        ({**FRAMEWORK, "mode": "reject"}, "TARGET_INPUT_DEFENSES.lenet5-mnist.mode: Input should"),
        ({**FRAMEWORK, "method": "other"}, "lenet5-mnist.method: Input should be 'self'"),
        ({**FRAMEWORK, "threshold": 1.0}, "lenet5-mnist.threshold: Input should be less than 1"),
        ({**FRAMEWORK, "threshold": 0}, "lenet5-mnist.threshold: Input should be greater than 0"),
        ({**FRAMEWORK, "pass_rate": 1.5}, "lenet5-mnist.pass_rate: Input should be less than 1"),
        ({**FRAMEWORK, "pass_rate": "0.9"}, "lenet5-mnist.pass_rate: Input should be a valid"),
        ({**FRAMEWORK, "alarm_share": 0}, "lenet5-mnist.alarm_share: Input should be greater"),
        ({**FRAMEWORK, "window": 10}, "lenet5-mnist.window: Extra inputs are not permitted"),
    ],
)
def test_settings_refuse_a_bad_input_defence_naming_key_and_value(
    spec: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TARGET_MODELS", json.dumps([MODEL]))
    monkeypatch.setenv("TARGET_INPUT_DEFENSES", json.dumps({MODEL: spec}))
    with pytest.raises(ValidationError) as info:
        Settings()
    described = describe_settings_error(info.value)
    assert message in described
    bad_key = re.search(r"lenet5-mnist\.(\w+):", message).group(1)  # type: ignore[union-attr]
    assert f"(got {spec[bad_key]!r})" in described


def test_settings_refuse_an_input_defence_for_a_model_not_hosted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TARGET_MODELS", json.dumps([MODEL]))
    monkeypatch.setenv("TARGET_INPUT_DEFENSES", json.dumps({"c3f2-mnist": FRAMEWORK}))
    with pytest.raises(ValidationError, match="TARGET_INPUT_DEFENSES names model 'c3f2-mnist'"):
        Settings()


@pytest.mark.parametrize(
    ("spec", "code", "message"),
    [
        (  # refused by Settings, before any model loads
            {**FRAMEWORK, "threshold": 1.5},
            2,
            "TARGET_INPUT_DEFENSES.lenet5-mnist.threshold: Input should be less than 1 (got 1.5)",
        ),
        (  # refused when the pair is loaded at start-up: none was built
            FRAMEWORK,
            3,
            "TARGET_INPUT_DEFENSES['lenet5-mnist']: there is no sanitised model at",
        ),
    ],
)
def test_serve_exits_non_zero_naming_the_bad_input_defence(
    live_server_factory: Callable[..., LiveServer], spec: dict[str, Any], code: int, message: str
) -> None:
    with pytest.raises(ServerStartError) as info:
        live_server_factory(input_defenses={MODEL: spec}, detectors={MODEL: {}})
    assert f"exited with code {code} " in str(info.value)
    assert message in str(info.value)
