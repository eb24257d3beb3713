"""Datasets and training jobs through the HTTP API, in-process (``TestClient``).

The service runs with ``training_workers=0``, so no worker process starts; where a test needs a
trained model it runs the queued job in the test process with ``worker.run_next_job`` (the
same code a worker process runs). Every bad input has a row in a table: the right status and
code, a message naming what was wrong, nothing created and nothing charged.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from defenses.calibration import Calibration
from mlcore.checkpoints import load_checkpoint
from mlcore.datasets import load_dataset
from mlcore.training import predict_labels
from mlcore.wire import encode_tensor
from target_service.app import create_app
from target_service.datasets import declared_members, validate_npz
from target_service.errors import ServiceError
from target_service.settings import Settings
from target_service.state import open_store
from target_service.worker import JobRunner, resume_path, run_next_job
from target_service.zoo import (
    calibrate_checkpoint,
    load_user_model,
    user_calibration_path,
    user_mi_reference_path,
    user_model_path,
)

ADMIN = "test-admin-token"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
MAX_UPLOAD = 300_000
TINY = {"epochs": 1, "batch_size": 32}
PRADA_ONLY = {"prada": {"delta": 0.95}}


def settings_for(state_dir: Path, checkpoint_dir: Path) -> Settings:
    return Settings(
        admin_token=ADMIN,
        state_dir=state_dir,
        checkpoint_dir=checkpoint_dir,
        models=["lenet5-mnist"],
        train_missing=False,
        training_workers=0,
        max_dataset_bytes=MAX_UPLOAD,
        calibration_clients=0,  # calibrating takes minutes; its own test turns it on
    )


@pytest.fixture(scope="module")
def app_settings(tmp_path_factory: pytest.TempPathFactory, trained_checkpoints: Path) -> Settings:
    return settings_for(tmp_path_factory.mktemp("training-api"), trained_checkpoints)


@pytest.fixture(scope="module")
def http(app_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings)) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create_client(http: TestClient, name: str, *, quota: int = 10**6, budget: int = 1000) -> str:
    response = http.post(
        "/v1/admin/clients",
        json={"name": name, "budget": budget, "training_quota": quota},
        headers=ADMIN_HEADERS,
    )
    assert response.status_code == 201, response.text
    return response.json()["api_key"]


def npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def digits(n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` real MNIST images of every class (a seeded draw from the embedded train split)."""
    data = load_dataset("mnist-embedded:target-train")
    index = np.random.default_rng(seed).choice(len(data), size=n, replace=False)
    return data.images.numpy()[index], data.labels.numpy()[index]


def upload(
    http: TestClient, key: str, body: bytes, *, name: str = "digits", query: str = ""
) -> Any:
    return http.post(
        f"/v1/datasets?name={name}{query}",
        content=body,
        headers={**bearer(key), "Content-Type": "application/octet-stream"},
    )


def upload_digits(http: TestClient, key: str, n: int = 200, *, seed: int = 0) -> str:
    images, labels = digits(n, seed=seed)
    response = upload(http, key, npz(images=images, labels=labels))
    assert response.status_code == 201, response.text
    return response.json()["dataset_id"]


def submit(http: TestClient, key: str, **body: Any) -> Any:
    job = {"arch": "lenet5", "recipe": TINY, "name": "mine", "detectors": PRADA_ONLY, **body}
    return http.post("/v1/training-jobs", json=job, headers=bearer(key))


def run_queued_job(settings: Settings) -> None:
    """Run the next queued job here, as a worker process would."""
    store = open_store(settings)
    try:
        assert run_next_job(store, settings, parent=os.getppid())
    finally:
        store.close()


# -- the npz validation table (unit) and the upload refusals (API) ---------------------------
IMAGES, LABELS = digits(20)
FLOATS = IMAGES.astype(np.float32) / 255


def declared(dataset: str, indices: list[int]) -> np.ndarray:
    """A provenance as ``defender condense`` writes it into its npz."""
    return np.array(json.dumps({"members": {"dataset": dataset, "indices": indices}}))


class BadUpload(NamedTuple):
    id: str
    body: bytes
    status: int
    code: str
    mentions: tuple[str, ...]
    query: str = ""


def _with_nan() -> np.ndarray:
    bad = FLOATS.copy()
    bad[3, 0, 5, 5] = np.nan
    return bad


def _npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, IMAGES)
    return buffer.getvalue()


BAD_UPLOADS = [
    BadUpload("not-npz", b"images,labels\n1,2\n", 422, "not_npz", ("npz",)),
    BadUpload("npy-not-npz", _npy(), 422, "not_npz", ("npz",)),
    BadUpload(
        "pickled-objects",
        npz(images=np.array([object()] * 3, dtype=object), labels=LABELS[:3]),
        422,
        "not_npz",
        ("Object arrays",),
    ),
    BadUpload("missing-labels", npz(images=IMAGES), 422, "missing_array", ("labels",)),
    BadUpload("missing-images", npz(labels=LABELS, x=IMAGES), 422, "missing_array", ("images",)),
    BadUpload(
        "lengths-differ",
        npz(images=IMAGES, labels=LABELS[:-1]),
        422,
        "length_mismatch",
        ("20", "19"),
    ),
    BadUpload(
        "negative-label",
        npz(images=IMAGES, labels=np.where(LABELS[0] == LABELS, -1, LABELS)),
        422,
        "invalid_labels",
        (">= 0", "-1"),
    ),
    BadUpload(
        "label-out-of-range",
        npz(images=IMAGES, labels=np.full(20, 7)),
        422,
        "invalid_labels",
        ("0..4", "7"),
        "&classes=5",
    ),
    BadUpload(
        "float-labels",
        npz(images=IMAGES, labels=LABELS.astype(np.float32)),
        422,
        "invalid_labels",
        ("integer", "float32"),
    ),
    BadUpload(
        "one-class",
        npz(images=IMAGES, labels=np.zeros(20, dtype=np.int64)),
        422,
        "invalid_labels",
        ("2..", "got 1"),
    ),
    BadUpload(
        "flat-images",
        npz(images=IMAGES.reshape(20, -1), labels=LABELS),
        422,
        "invalid_shape",
        ("[20, 784]",),
    ),
    BadUpload(
        "tiny-images",
        npz(images=IMAGES[:, :, :4, :4], labels=LABELS),
        422,
        "invalid_shape",
        ("[1, 4, 4]",),
    ),
    BadUpload(
        "two-channels",
        npz(images=np.repeat(IMAGES, 2, axis=1), labels=LABELS),
        422,
        "invalid_shape",
        ("[2, 28, 28]",),
    ),
    BadUpload(
        "int64-images",
        npz(images=IMAGES.astype(np.int64), labels=LABELS),
        422,
        "invalid_dtype",
        ("int64",),
    ),
    BadUpload(
        "nan-floats", npz(images=_with_nan(), labels=LABELS), 422, "invalid_values", ("NaN",)
    ),
    BadUpload(
        "floats-over-one",
        npz(images=FLOATS * 2, labels=LABELS),
        422,
        "invalid_values",
        ("[0, 1]", "2"),
    ),
    BadUpload(
        "over-size-limit",
        npz(images=np.zeros((400, 1, 28, 28), np.uint8), labels=np.arange(400) % 2),
        413,
        "body_too_large",
        (str(MAX_UPLOAD),),
    ),
    BadUpload(
        "members-out-of-range",
        npz(images=IMAGES, labels=LABELS, provenance=declared("mnist-embedded:test", [5, 1000])),
        422,
        "invalid_provenance",
        ("0..999", "1000"),
    ),
    BadUpload(
        "members-of-unknown-dataset",
        npz(images=IMAGES, labels=LABELS, provenance=declared("mnist-embedded:nope", [1])),
        422,
        "invalid_provenance",
        ("nope",),
    ),
    BadUpload(
        "provenance-not-json",
        npz(images=IMAGES, labels=LABELS, provenance=np.array("members: 1")),
        422,
        "invalid_provenance",
        ("JSON",),
    ),
]


@pytest.mark.parametrize("case", [c for c in BAD_UPLOADS if c.status == 422], ids=lambda c: c.id)
def test_validate_npz_refuses(case: BadUpload, tmp_path: Path) -> None:
    path = tmp_path / "upload.npz"
    path.write_bytes(case.body)
    classes = int(case.query.split("=")[1]) if case.query else None
    with pytest.raises(ServiceError) as caught:
        validate_npz(path, classes=classes, max_classes=1000, max_unpacked_bytes=10**9)
        declared_members(path, data_root=None)  # the route's second check
    assert caught.value.code == case.code
    for text in case.mentions:
        assert text in caught.value.message


@pytest.mark.parametrize(
    "images", [IMAGES, IMAGES[:, 0], FLOATS], ids=["uint8-nchw", "uint8-nhw", "float32"]
)
def test_validate_npz_accepts(images: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "upload.npz"
    path.write_bytes(npz(images=images, labels=LABELS))
    summary = validate_npz(path, classes=None, max_classes=1000, max_unpacked_bytes=10**9)
    assert (summary.n, summary.shape, summary.classes) == (20, [1, 28, 28], int(LABELS.max()) + 1)


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=lambda c: c.id)
def test_bad_upload_refused_creates_and_charges_nothing(
    case: BadUpload, http: TestClient, app_settings: Settings
) -> None:
    key = create_client(http, f"uploader-{case.id}")
    response = upload(http, key, case.body, query=case.query)
    assert response.status_code == case.status, response.text
    error = response.json()["error"]
    assert error["code"] == case.code
    for text in case.mentions:
        assert text in error["message"]
    assert http.get("/v1/datasets", headers=bearer(key)).json() == []
    leftovers = [p.name for p in (app_settings.state_dir / "datasets").iterdir()]
    assert leftovers == [] or all(p.endswith(".npz") for p in leftovers)  # no temp file left
    view = account_by_name(http, f"uploader-{case.id}")
    assert (view["queries_used"], view["training_used"]) == (0, 0)


def test_streamed_upload_over_limit_is_413_without_content_length(http: TestClient) -> None:
    key = create_client(http, "chunked-uploader")
    chunk = bytes(64 * 1024)

    def body() -> Iterator[bytes]:
        for _ in range(MAX_UPLOAD // len(chunk) + 2):
            yield chunk

    response = http.post(
        "/v1/datasets?name=big",
        content=body(),
        headers={**bearer(key), "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "body_too_large"
    assert http.get("/v1/datasets", headers=bearer(key)).json() == []


def account_by_name(http: TestClient, name: str) -> dict[str, Any]:
    for client in http.get("/v1/admin/clients", headers=ADMIN_HEADERS).json():
        if client["name"] == name:
            return http.get(
                f"/v1/admin/clients/{client['client_id']}", headers=ADMIN_HEADERS
            ).json()
    raise AssertionError(f"no client named {name}")


# -- datasets: owner only ----------------------------------------------------------------------
def test_dataset_upload_list_get_delete_owner_only(
    http: TestClient, app_settings: Settings
) -> None:
    owner, other = create_client(http, "ds-owner"), create_client(http, "ds-other")
    images, labels = digits(50)
    body = npz(images=images, labels=labels)
    response = upload(http, owner, body)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["n"] == 50 and created["shape"] == [1, 28, 28] and created["classes"] == 10
    assert created["sha256"] == hashlib.sha256(body).hexdigest()
    dataset_id = created["dataset_id"]
    assert (app_settings.state_dir / "datasets" / f"{dataset_id}.npz").read_bytes() == body
    assert [d["dataset_id"] for d in http.get("/v1/datasets", headers=bearer(owner)).json()] == [
        dataset_id
    ]
    assert http.get(f"/v1/datasets/{dataset_id}", headers=bearer(owner)).json() == created
    for method in (http.get, http.delete):
        refused = method(f"/v1/datasets/{dataset_id}", headers=bearer(other))
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "unknown_dataset"
    assert http.get("/v1/datasets", headers=bearer(other)).json() == []
    assert http.delete(f"/v1/datasets/{dataset_id}", headers=bearer(owner)).status_code == 200
    assert http.get(f"/v1/datasets/{dataset_id}", headers=bearer(owner)).status_code == 404
    assert not (app_settings.state_dir / "datasets" / f"{dataset_id}.npz").exists()


# -- job refusals ------------------------------------------------------------------------------
class BadJob(NamedTuple):
    id: str
    status: int
    code: str
    mentions: tuple[str, ...]
    body: Callable[[dict[str, str]], dict[str, Any]]  # from {"dataset", "other_dataset", "small"}
    quota: int = 10**6


BAD_JOBS = [
    BadJob(
        "unknown-arch",
        422,
        "invalid_input",
        ("arch", "vgg99"),
        lambda d: {"dataset_id": d["dataset"], "arch": "vgg99"},
    ),
    BadJob(
        "unknown-recipe",
        422,
        "invalid_input",
        ("recipe", "slowest"),
        lambda d: {"dataset_id": d["dataset"], "recipe": "slowest"},
    ),
    BadJob(
        "recipe-zero-epochs",
        422,
        "invalid_input",
        ("epochs",),
        lambda d: {"dataset_id": d["dataset"], "recipe": {"epochs": 0}},
    ),
    BadJob(
        "recipe-string-epochs",
        422,
        "invalid_input",
        ("epochs",),
        lambda d: {"dataset_id": d["dataset"], "recipe": {"epochs": "3"}},
    ),
    BadJob(
        "bad-output-policy",
        422,
        "invalid_input",
        ("output policy",),
        lambda d: {"dataset_id": d["dataset"], "output_policy": "logits"},
    ),
    BadJob(
        "bad-detector",
        422,
        "invalid_input",
        ("detector", "wizard"),
        lambda d: {"dataset_id": d["dataset"], "detectors": {"wizard": {}}},
    ),
    BadJob(
        "bad-name",
        422,
        "invalid_input",
        ("name",),
        lambda d: {"dataset_id": d["dataset"], "name": "../etc"},
    ),
    BadJob(
        "arch-rejects-shape",
        422,
        "arch_rejects_data",
        ("lenet5", "[1, 20, 20]"),
        lambda d: {"dataset_id": d["small"]},
    ),
    BadJob(
        "quota-exceeded",
        402,
        "training_quota_exceeded",
        ("200 images x 1 epochs", "199"),
        lambda d: {"dataset_id": d["dataset"]},
        quota=199,
    ),
    BadJob(
        "no-quota",
        402,
        "training_quota_exceeded",
        ("of 0",),
        lambda d: {"dataset_id": d["dataset"]},
        quota=0,
    ),
    BadJob(
        "another-clients-dataset",
        404,
        "unknown_dataset",
        ("no dataset",),
        lambda d: {"dataset_id": d["other_dataset"]},
    ),
    BadJob("unknown-dataset", 404, "unknown_dataset", ("nope",), lambda d: {"dataset_id": "nope"}),
    BadJob(
        "another-clients-test-dataset",
        404,
        "unknown_dataset",
        ("no dataset",),
        lambda d: {"dataset_id": d["dataset"], "test_dataset_id": d["other_dataset"]},
    ),
]


@pytest.fixture(scope="module")
def other_dataset(http: TestClient) -> str:
    return upload_digits(http, create_client(http, "dataset-neighbour"), 20)


@pytest.mark.parametrize("case", BAD_JOBS, ids=lambda c: c.id)
def test_bad_job_refused_creates_and_charges_nothing(
    case: BadJob, http: TestClient, other_dataset: str
) -> None:
    name = f"trainer-{case.id}"
    key = create_client(http, name, quota=case.quota)
    images, labels = digits(20)
    small = upload(
        http, key, npz(images=images[:, :, 4:24, 4:24].copy(), labels=labels), name="small"
    ).json()["dataset_id"]
    ids = {"dataset": upload_digits(http, key, 200), "other_dataset": other_dataset, "small": small}
    response = submit(http, key, **case.body(ids))
    assert response.status_code == case.status, response.text
    error = response.json()["error"]
    assert error["code"] == case.code
    for text in case.mentions:
        assert text in error["message"]
    assert http.get("/v1/training-jobs", headers=bearer(key)).json() == []
    view = account_by_name(http, name)
    assert (view["training_used"], view["training_ledger"], view["queries_used"]) == (0, [], 0)


def test_model_name_taken_is_409_and_charges_nothing(http: TestClient) -> None:
    key = create_client(http, "taker", quota=10**6)
    dataset = upload_digits(http, key, 40)
    first = submit(http, key, dataset_id=dataset, name="twice")
    assert first.status_code == 202, first.text
    used_before = account_by_name(http, "taker")["training_used"]
    second = submit(http, key, dataset_id=dataset, name="twice")
    assert second.status_code == 409, second.text
    assert second.json()["error"]["code"] == "model_name_taken"
    assert "u/taker/twice" in second.json()["error"]["message"]
    assert len(http.get("/v1/training-jobs", headers=bearer(key)).json()) == 1
    assert account_by_name(http, "taker")["training_used"] == used_before == 40
    http.delete(f"/v1/training-jobs/{first.json()['job_id']}", headers=bearer(key))


# -- a job end to end in this process: hosting, privacy, metering, quota ------------------------
def test_trained_private_model_is_hosted_for_its_owner_only(
    http: TestClient, app_settings: Settings
) -> None:
    owner, other = create_client(http, "pat", budget=500), create_client(http, "quinn")
    dataset = upload_digits(http, owner, 200)
    queued = submit(http, owner, dataset_id=dataset, name="secret", publish="private")
    assert queued.status_code == 202, queued.text
    assert queued.json()["status"] == "queued" and queued.json()["model"] == "u/pat/secret"
    job_id = queued.json()["job_id"]
    run_queued_job(app_settings)

    job = http.get(f"/v1/training-jobs/{job_id}", headers=bearer(owner)).json()
    assert job["status"] == "succeeded" and job["model"] == "u/pat/secret"
    assert (job["epoch"], job["epochs"], job["metrics"]["train_size"]) == (1, 1, 200)
    assert http.get(f"/v1/training-jobs/{job_id}", headers=bearer(other)).status_code == 404

    names = lambda key: [m["name"] for m in http.get("/v1/models", headers=key).json()["models"]]  # noqa: E731
    assert "u/pat/secret" in names(bearer(owner))
    assert "u/pat/secret" not in names(bearer(other))
    assert "u/pat/secret" not in names({})

    x = digits(30, seed=5)[0]
    body = {"inputs": encode_tensor(x).model_dump()}
    hidden = http.post("/v1/models/u/pat/secret/predict", json=body, headers=bearer(other))
    unknown = http.post("/v1/models/u/pat/nothing/predict", json=body, headers=bearer(other))
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.json()["error"]["code"] == unknown.json()["error"]["code"] == "unknown_model"
    assert "secret" not in str(unknown.json()) and "u/pat/secret" not in str(hidden.json()).replace(
        "'u/pat/secret'", ""
    )
    answered = http.post("/v1/models/u/pat/secret/predict", json=body, headers=bearer(owner))
    assert answered.status_code == 200, answered.text
    assert answered.json()["queries_used"] == 30  # metered like any model
    checkpoint = load_checkpoint(user_model_path(app_settings.state_dir, job_id))
    expected = predict_labels(checkpoint.model, torch.from_numpy(x)).tolist()
    assert answered.json()["labels"] == expected  # the trained weights answer
    view = account_by_name(http, "pat")
    assert "u/pat/secret" in view["detectors_by_model"]  # watched by the detectors
    assert view["detectors_by_model"]["u/pat/secret"]["prada"]["queries_seen"] == 30
    assert view["training_used"] == 200
    assert [(e["image_epochs"], e["reason"]) for e in view["training_ledger"]] == [
        (200, "reserved")
    ]


def test_members_declared_by_an_upload_can_be_challenged(
    http: TestClient, app_settings: Settings
) -> None:
    """A condensed set's npz declares the real images it was made from; a model trained on it
    through a job records them, and a membership challenge draws its members from them (a
    model trained on an upload without a declaration has no members: 422 no_members)."""
    key = create_client(http, "condenser")
    client_id = account_by_name(http, "condenser")["client_id"]
    images, labels = digits(40, seed=5)
    members = list(range(0, 300, 3))  # 100 images of mnist-embedded:target-train
    bodies = {
        "declared": npz(
            images=images,
            labels=labels,
            provenance=declared("mnist-embedded:target-train", members),
        ),
        "undeclared": npz(images=images, labels=labels),
    }
    challenges = {}
    for name, body in bodies.items():
        uploaded = upload(http, key, body, name=name)
        assert uploaded.status_code == 201, uploaded.text
        queued = submit(http, key, dataset_id=uploaded.json()["dataset_id"], name=name)
        assert queued.status_code == 202, queued.text
        run_queued_job(app_settings)
        challenges[name] = http.post(
            "/v1/admin/membership-challenges",
            json={"model": f"u/condenser/{name}", "client_id": client_id, "n": 20, "seed": 1},
            headers=ADMIN_HEADERS,
        )
    assert challenges["undeclared"].status_code == 422
    assert challenges["undeclared"].json()["error"]["code"] == "no_members"
    assert challenges["declared"].status_code == 201, challenges["declared"].text
    state = open_store(app_settings)
    try:
        stored = state.get_membership_challenge(challenges["declared"].json()["challenge_id"])
    finally:
        state.close()
    assert stored["members_from"] == "mnist-embedded:target-train"
    drawn = [index for is_member, index in stored["candidates"] if is_member]
    assert len(drawn) == 10 and set(drawn) <= set(members)


def test_public_model_with_mi_reference_from_the_uploaded_data(
    http: TestClient, app_settings: Settings
) -> None:
    owner, other = create_client(http, "rae"), create_client(http, "sam", budget=50)
    dataset = upload_digits(http, owner, 150, seed=3)
    queued = submit(
        http,
        owner,
        dataset_id=dataset,
        name="open",
        publish="public",
        output_policy="top-k:2",
        detectors={"prada": {"delta": 0.95}, "mi_redundancy": {"window": 20}},
        recipe={"epochs": 1, "validation_split": 0.2},
    )
    assert queued.status_code == 202, queued.text
    run_queued_job(app_settings)
    job = http.get(f"/v1/training-jobs/{queued.json()['job_id']}", headers=bearer(owner)).json()
    assert job["status"] == "succeeded", job
    assert job["metrics"]["train_size"] == 120 and job["metrics"]["validation_size"] == 30
    assert 0 <= job["metrics"]["validation_accuracy"] <= 1
    reference = user_mi_reference_path(app_settings.state_dir, job["job_id"])
    assert '"n_images": 120' in reference.read_text()  # measured on the client's training part
    listed = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
    assert listed["u/rae/open"]["output_policy"] == "top-k:2"
    body = {"inputs": encode_tensor(digits(5, seed=9)[0]).model_dump()}
    answered = http.post("/v1/models/u/rae/open/predict", json=body, headers=bearer(other))
    assert answered.status_code == 200 and len(answered.json()["top_k"][0]) == 2
    view = account_by_name(http, "sam")
    assert set(view["detectors_by_model"]["u/rae/open"]) == {"prada", "mi_redundancy"}
    assert view["queries_used"] == 5


def test_published_model_gets_the_calibration_made_on_the_clients_data(
    http: TestClient, app_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker calibrates the detectors on the client's training images and the hosted model
    applies the thresholds; a calibration it cannot make is skipped, said so, and not fatal."""
    key = create_client(http, "cal")
    dataset = upload_digits(http, key, 120, seed=4)
    detectors = {"prada": {}, "mi_redundancy": {"window": 20}}
    state = open_store(app_settings)
    try:
        few = app_settings.model_copy(update={"calibration_clients": 3})
        skipped = submit(http, key, dataset_id=dataset, name="few", detectors=detectors)
        run_queued_job(few)  # 3 clients cannot give the default 1% share
        job = state.get_job(skipped.json()["job_id"])
        assert job["status"] == "succeeded", job
        assert "needs clients >= 99, got 3" in job["metrics"]["calibration_skipped"]
        assert not user_calibration_path(app_settings.state_dir, job["job_id"]).exists()

        small = functools.partial(calibrate_checkpoint, share=0.25, horizon=200)
        monkeypatch.setattr("target_service.worker.calibrate_checkpoint", small)
        queued = submit(http, key, dataset_id=dataset, name="calibrated", detectors=detectors)
        run_queued_job(few)
        job = state.get_job(queued.json()["job_id"])
    finally:
        state.close()
    assert job["status"] == "succeeded" and "calibration_skipped" not in job["metrics"], job
    calibration = Calibration.load(user_calibration_path(app_settings.state_dir, job["job_id"]))
    checkpoint = user_model_path(app_settings.state_dir, job["job_id"])
    assert (
        calibration.source["checkpoint_sha256"]
        == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    )
    assert calibration.clients == 3 and calibration.source["images"] == f"upload:{dataset}"
    applied = load_user_model(job, app_settings.state_dir).defence.detectors
    assert applied["prada"]["delta"] == calibration.threshold("prada") != 0.95  # PRADA's default
    assert applied["mi_redundancy"]["threshold"] == calibration.threshold("mi_redundancy")


def test_cancel_refunds_and_admin_sees_every_job_and_dataset(http: TestClient) -> None:
    key = create_client(http, "tess")
    dataset = upload_digits(http, key, 60)
    job_id = submit(http, key, dataset_id=dataset, name="gone", recipe={"epochs": 3}).json()[
        "job_id"
    ]
    assert account_by_name(http, "tess")["training_used"] == 180
    jobs = {
        j["job_id"]: j for j in http.get("/v1/admin/training-jobs", headers=ADMIN_HEADERS).json()
    }
    assert jobs[job_id]["status"] == "queued" and jobs[job_id]["requested_model"] == "u/tess/gone"
    cancelled = http.delete(f"/v1/admin/training-jobs/{job_id}", headers=ADMIN_HEADERS)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = http.delete(f"/v1/training-jobs/{job_id}", headers=bearer(key))
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    view = account_by_name(http, "tess")
    assert view["training_used"] == 0
    assert [(e["image_epochs"], e["reason"]) for e in view["training_ledger"]] == [
        (180, "reserved"),
        (-180, "cancelled"),
    ]
    admin_datasets = http.get("/v1/admin/datasets", headers=ADMIN_HEADERS).json()
    assert dataset in {d["dataset_id"] for d in admin_datasets}
    assert http.delete(f"/v1/admin/datasets/{dataset}", headers=ADMIN_HEADERS).status_code == 200
    assert http.get(f"/v1/datasets/{dataset}", headers=bearer(key)).status_code == 404
    for path in ("/v1/admin/training-jobs", "/v1/admin/datasets"):
        assert http.get(path, headers=bearer(key)).status_code == 403


@pytest.mark.parametrize(
    "quota", [True, "100", -1, 1.5], ids=["bool", "string", "negative", "float"]
)
def test_training_quota_takes_only_a_whole_number(http: TestClient, quota: Any) -> None:
    before = len(http.get("/v1/admin/clients", headers=ADMIN_HEADERS).json())
    response = http.post(
        "/v1/admin/clients",
        json={"name": "strict", "budget": 10, "training_quota": quota},
        headers=ADMIN_HEADERS,
    )
    assert response.status_code == 422, response.text
    assert "training_quota" in response.json()["error"]["message"]
    assert len(http.get("/v1/admin/clients", headers=ADMIN_HEADERS).json()) == before


def test_a_job_whose_dataset_was_deleted_fails_with_the_reason_and_a_refund(
    http: TestClient, app_settings: Settings
) -> None:
    key = create_client(http, "uma")
    dataset = upload_digits(http, key, 30)
    job_id = submit(http, key, dataset_id=dataset, name="orphan", recipe={"epochs": 2}).json()[
        "job_id"
    ]
    assert http.delete(f"/v1/datasets/{dataset}", headers=bearer(key)).status_code == 200
    run_queued_job(app_settings)
    job = http.get(f"/v1/training-jobs/{job_id}", headers=bearer(key)).json()
    assert job["status"] == "failed" and job["model"] is None
    assert f"dataset {dataset} was deleted" in job["error"]
    view = account_by_name(http, "uma")
    assert view["training_used"] == 0
    assert [e["reason"] for e in view["training_ledger"]] == ["reserved", "failed"]
    names = [m["name"] for m in http.get("/v1/models", headers=bearer(key)).json()["models"]]
    assert "u/uma/orphan" not in names


def test_upload_headers_are_checked_before_the_body_is_streamed(http: TestClient) -> None:
    key = create_client(http, "header-checks")
    body = npz(images=IMAGES, labels=LABELS)
    no_key = http.post("/v1/datasets?name=d", content=body)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "missing_api_key"
    gzipped = http.post(
        "/v1/datasets?name=d",
        content=body,
        headers={**bearer(key), "Content-Encoding": "gzip"},
    )
    assert gzipped.status_code == 400, gzipped.text
    assert gzipped.json()["error"]["code"] == "unsupported_content_encoding"
    assert http.get("/v1/datasets", headers=bearer(key)).json() == []


def test_a_worker_that_lost_its_job_writes_and_records_nothing(
    http: TestClient, app_settings: Settings
) -> None:
    key = create_client(http, "vic")
    dataset = upload_digits(http, key, 40)
    job_id = submit(http, key, dataset_id=dataset, name="contested").json()["job_id"]
    store = open_store(app_settings)
    try:
        stale = store.claim_job("stale", lease_seconds=0.01)
        assert stale is not None and stale["job_id"] == job_id
        time.sleep(0.05)
        assert store.claim_job("fresh", lease_seconds=60) is not None  # the lease ran out
        JobRunner(store, app_settings, stale, "stale", os.getppid()).run()  # drops the job
        job = store.get_job(job_id)
        assert (job["status"], job["claim_token"], job["epoch"]) == ("running", "fresh", 0)
        assert store.epoch_log(job_id) == []
        assert not resume_path(app_settings.state_dir, job_id).exists()
        assert not user_model_path(app_settings.state_dir, job_id).exists()
        store.cancel_job(job_id)
    finally:
        store.close()
