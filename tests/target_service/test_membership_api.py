"""Membership challenges in-process: the candidates never reveal membership, a perfect oracle
scores AUC 1, one submission per challenge, another client's challenge is 404, bad scores are
422 and nothing is charged; results survive a restart."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from mlcore.datasets import load_dataset
from target_service.app import create_app
from target_service.settings import Settings

ADMIN = {"Authorization": "Bearer test-admin-token"}
MODEL = "lenet5-mnist"
CANDIDATE_FIELDS = {
    "challenge_id", "model", "n", "images", "labels", "queries_remaining", "submitted",
}  # fmt: skip


def make_app(state_dir: Path, checkpoint_dir: Path) -> TestClient:
    settings = Settings(
        admin_token="test-admin-token",
        state_dir=state_dir,
        checkpoint_dir=checkpoint_dir,
        models=[MODEL],
        train_missing=False,
        detectors={MODEL: {}},
    )
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("membership-state")


@pytest.fixture(scope="module")
def app(state_dir: Path, trained_checkpoints: Path) -> Iterator[TestClient]:
    with make_app(state_dir, trained_checkpoints) as client:
        yield client


def new_client(app: TestClient, name: str, budget: int = 100) -> tuple[str, dict[str, str]]:
    body = app.post("/v1/admin/clients", json={"name": name, "budget": budget}, headers=ADMIN)
    assert body.status_code == 201, body.text
    return body.json()["client_id"], {"Authorization": f"Bearer {body.json()['api_key']}"}


def post_challenge(
    app: TestClient, client_id: str, n: int, *, seed: int = 0, headers: dict[str, str] = ADMIN
) -> Any:
    return app.post(
        "/v1/admin/membership-challenges",
        json={"model": MODEL, "client_id": client_id, "n": n, "seed": seed},
        headers=headers,
    )


def open_challenge(app: TestClient, client_id: str, n: int = 40, seed: int = 0) -> str:
    response = post_challenge(app, client_id, n, seed=seed)
    assert response.status_code == 201, response.text
    return response.json()["challenge_id"]


def candidates(payload: dict[str, Any]) -> np.ndarray:
    images = payload["images"]
    raw = base64.b64decode(images["data"])
    return np.frombuffer(raw, dtype=np.uint8).reshape(images["shape"])


def truth_from_the_data(images: np.ndarray) -> np.ndarray:
    """What only a perfect oracle knows: which candidates are in the target's training split
    (and the others, in the held-out test split)."""
    train = {
        image.tobytes() for image in load_dataset("mnist-embedded:target-train").images.numpy()
    }
    test = {image.tobytes() for image in load_dataset("mnist-embedded:test").images.numpy()}
    members = np.array([image.tobytes() in train for image in images])
    assert all(image.tobytes() in test for image in images[~members])
    return members


def test_the_candidates_never_reveal_membership_and_a_perfect_oracle_scores_auc_1(
    app: TestClient,
) -> None:
    client_id, key = new_client(app, "oracle")
    challenge_id = open_challenge(app, client_id, n=40, seed=3)
    response = app.get(f"/v1/membership-challenges/{challenge_id}", headers=key)
    assert response.status_code == 200
    payload = response.json()
    assert set(payload) == CANDIDATE_FIELDS  # no field could carry membership
    assert "member" not in json.dumps({k: v for k, v in payload.items() if k != "images"})
    admin_view = app.get(f"/v1/admin/membership-challenges/{challenge_id}", headers=ADMIN).json()
    assert "candidates" not in admin_view and "member" not in json.dumps(admin_view).replace(
        "members_from", ""
    )
    images = candidates(payload)
    assert images.shape == (40, 1, 28, 28) and payload["queries_remaining"] == 100
    members = truth_from_the_data(images)
    assert members.sum() == 20  # balanced
    assert 0 < members[:20].sum() < 20  # shuffled, not members first
    result = app.post(
        f"/v1/membership-challenges/{challenge_id}/scores",
        json={"scores": members.astype(int).tolist()},  # JSON integers are numbers too
        headers=key,
    )
    assert result.status_code == 200, result.text
    figures = result.json()
    assert figures["auc"] == 1.0 and figures["balanced_accuracy"] == 1.0
    assert figures["tpr_at_1pct_fpr"] == 1.0 and figures["tpr_at_01pct_fpr"] == 1.0
    inverted = app.post(
        f"/v1/membership-challenges/{open_challenge(app, client_id, n=40, seed=3)}/scores",
        json={"scores": (~members).astype(float).tolist()},
        headers=key,
    ).json()
    assert inverted["auc"] == 0.0
    kept = app.get(f"/v1/admin/membership-challenges/{challenge_id}", headers=ADMIN).json()
    assert kept["result"]["auc"] == 1.0 and kept["submitted_at"] is not None
    again = app.post(
        f"/v1/membership-challenges/{challenge_id}/scores",
        json={"scores": [0.0] * 40},
        headers=key,
    )
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_submitted"
    assert (
        app.get(f"/v1/admin/membership-challenges/{challenge_id}", headers=ADMIN).json()["result"]
        == kept["result"]
    )
    assert app.get(f"/v1/membership-challenges/{challenge_id}", headers=key).json()["submitted"]


def test_another_clients_challenge_is_not_found(app: TestClient) -> None:
    owner_id, _ = new_client(app, "owner")
    _, other = new_client(app, "other")
    challenge_id = open_challenge(app, owner_id)
    for response in (
        app.get(f"/v1/membership-challenges/{challenge_id}", headers=other),
        app.post(
            f"/v1/membership-challenges/{challenge_id}/scores",
            json={"scores": [0.0] * 40},
            headers=other,
        ),
        app.get("/v1/membership-challenges/nope", headers=other),
    ):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "unknown_challenge"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"scores": [0.5, 0.5]}', "need exactly 40 scores (one per candidate), got 2"),
        ('{"scores": [' + ", ".join(["0.5"] * 39 + ["NaN"]) + "]}", "score 39 is nan"),
        ('{"scores": [' + ", ".join(["Infinity"] * 40) + "]}", "score 0 is inf"),
        ('{"scores": ["high"]}', "scores.0"),
    ],
)
def test_bad_scores_are_refused_and_leave_the_challenge_open(
    app: TestClient, body: str, message: str
) -> None:
    client_id, key = new_client(app, "careless")
    challenge_id = open_challenge(app, client_id)
    response = app.post(
        f"/v1/membership-challenges/{challenge_id}/scores",
        content=body,
        headers={**key, "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert message in response.json()["error"]["message"]
    fine = app.post(
        f"/v1/membership-challenges/{challenge_id}/scores", json={"scores": [0.0] * 40}, headers=key
    )
    assert fine.status_code == 200 and fine.json()["auc"] == 0.5
    view = app.get(f"/v1/admin/clients/{client_id}", headers=ADMIN).json()
    assert view["queries_used"] == 0  # reading and scoring cost nothing


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": MODEL, "n": 41}, 422, "n must be even"),
        ({"model": MODEL, "n": 2002}, 422, "needs 1001 non-members in mnist-embedded:test"),
        ({"model": "nope", "n": 10}, 404, "no model named 'nope'"),
        ({"model": MODEL, "n": 10, "client_id": "ghost"}, 404, "no client with id 'ghost'"),
        ({"model": MODEL, "n": 0}, 422, "n"),
    ],
)
def test_bad_challenges_are_refused(
    app: TestClient, body: dict[str, Any], status: int, message: str
) -> None:
    client_id, _ = new_client(app, "target")
    response = app.post(
        "/v1/admin/membership-challenges",
        json={"client_id": client_id, "seed": 0, **body},
        headers=ADMIN,
    )
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_only_the_admin_opens_challenges(app: TestClient) -> None:
    client_id, key = new_client(app, "sneaky")
    assert post_challenge(app, client_id, 10, headers=key).status_code == 403


def test_results_survive_a_restart(state_dir: Path, trained_checkpoints: Path) -> None:
    with make_app(state_dir, trained_checkpoints) as app:
        client_id, key = new_client(app, "durable")
        challenge_id = open_challenge(app, client_id, n=10, seed=1)
        images = app.get(f"/v1/membership-challenges/{challenge_id}", headers=key).json()["images"]
        app.post(
            f"/v1/membership-challenges/{challenge_id}/scores",
            json={"scores": list(range(10))},
            headers=key,
        )
        result = app.get(f"/v1/admin/membership-challenges/{challenge_id}", headers=ADMIN).json()
    with make_app(state_dir, trained_checkpoints) as app:
        assert (
            app.get(f"/v1/admin/membership-challenges/{challenge_id}", headers=ADMIN).json()
            == result
        )
        again = app.get(f"/v1/membership-challenges/{challenge_id}", headers=key).json()
        assert again["images"] == images and again["submitted"]
        refused = app.post(
            f"/v1/membership-challenges/{challenge_id}/scores",
            json={"scores": list(range(10))},
            headers=key,
        )
        assert refused.status_code == 409


def _resave(source: Path, target_dir: Path, **changes: Any) -> Path:
    """``lenet5-mnist.pt`` from ``source`` saved into ``target_dir`` with another dataset or
    provenance (as a model trained on a subset or a condensed set records its members)."""
    from mlcore.checkpoints import load_checkpoint, save_checkpoint

    checkpoint = load_checkpoint(source / f"{MODEL}.pt")
    save_checkpoint(
        target_dir / f"{MODEL}.pt",
        checkpoint.model,
        arch=checkpoint.arch,
        arch_kwargs=checkpoint.arch_kwargs,
        dataset=changes.get("dataset", checkpoint.dataset),
        provenance=changes.get("provenance", {}),
    )
    return target_dir


def test_members_recorded_in_the_checkpoint_are_the_members_drawn(
    tmp_path: Path, trained_checkpoints: Path
) -> None:
    recorded = [3, 10, 11, 42, 100, 512, 777, 1000, 2048, 2499]
    checkpoints = _resave(
        trained_checkpoints,
        tmp_path / "subset",
        provenance={"members": {"dataset": "mnist-embedded:target-train", "indices": recorded}},
    )
    with make_app(tmp_path / "state", checkpoints) as app:
        client_id, key = new_client(app, "subset")
        challenge_id = open_challenge(app, client_id, n=20)
        images = candidates(
            app.get(f"/v1/membership-challenges/{challenge_id}", headers=key).json()
        )
        train = load_dataset("mnist-embedded:target-train").images.numpy()
        expected = {train[i].tobytes() for i in recorded}
        members = truth_from_the_data(images)
        assert {image.tobytes() for image in images[members]} == expected
        too_many = post_challenge(app, client_id, 22)
        assert too_many.status_code == 422
        assert (
            "needs 11 members in mnist-embedded:target-train" in too_many.json()["error"]["message"]
        )


def test_a_model_without_registry_members_is_refused(
    tmp_path: Path, trained_checkpoints: Path
) -> None:
    checkpoints = _resave(trained_checkpoints, tmp_path / "upload", dataset="upload:abc123")
    with make_app(tmp_path / "state", checkpoints) as app:
        client_id, _ = new_client(app, "nobody")
        response = post_challenge(app, client_id, 10)
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "no_members"
        assert "'upload:abc123'" in response.json()["error"]["message"]
