"""Training through a real ``target-service serve`` process and its worker processes: upload,
train, the job succeeds, and the hosted model answers with the trained weights; a private model
is invisible to another key; a quota refusal charges nothing; ``kill -9`` mid-training and a
restart complete the job exactly once, resumed from its last epoch checkpoint."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pytest
from typer.testing import CliRunner

from attacker.oracle import HttpOracle
from defenses.cli import app
from mlcore.datasets import load_dataset
from mlcore.wire import encode_tensor
from target_service.testing import LiveServer

pytestmark = pytest.mark.e2e

# No detector calibration after training (minutes per model; tests/target_service covers it).
FAST_LEASE = {"training_lease_seconds": 2, "training_poll_seconds": 0.2, "calibration_clients": 0}
PRADA_ONLY = {"prada": {"delta": 0.95}}


def create_client(server: LiveServer, name: str, *, budget: int, quota: int) -> str:
    response = httpx2.post(
        f"{server.url}/v1/admin/clients",
        json={"name": name, "budget": budget, "training_quota": quota},
        headers=server.admin_headers,
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return response.json()["api_key"]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sample(spec: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    data = load_dataset(spec)
    index = np.random.default_rng(seed).choice(len(data), size=n, replace=False)
    return data.images.numpy()[index], data.labels.numpy()[index]


def upload(http: httpx2.Client, key: str, images: np.ndarray, labels: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels)
    response = http.post(
        "/v1/datasets?name=digits",
        content=buffer.getvalue(),
        headers={**auth(key), "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 201, response.text
    return response.json()["dataset_id"]


def submit(http: httpx2.Client, key: str, **body: Any) -> str:
    """Queue a LeNet-5 job (PRADA only unless ``detectors`` says otherwise: the MI reference
    takes a while to measure)."""
    job = {"arch": "lenet5", "detectors": PRADA_ONLY, **body}
    response = http.post("/v1/training-jobs", json=job, headers=auth(key))
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def wait_for(
    http: httpx2.Client,
    key: str,
    job_id: str,
    done: Callable[[dict[str, Any]], bool],
    timeout: float = 300,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/v1/training-jobs/{job_id}", headers=auth(key)).json()
        if job["status"] == "failed" or done(job):
            return job
        assert time.monotonic() < deadline, f"job still {job}"
        time.sleep(0.2)


def predict(http: httpx2.Client, key: str, model: str, images: np.ndarray) -> httpx2.Response:
    return http.post(
        f"/v1/models/{model}/predict",
        json={"inputs": encode_tensor(images).model_dump()},
        headers=auth(key),
    )


@pytest.fixture(scope="module")
def server(module_server_factory: Callable[..., LiveServer]) -> LiveServer:
    return module_server_factory(**FAST_LEASE)


def test_upload_train_host_private_and_quota(server: LiveServer) -> None:
    alice = create_client(server, "alice", budget=1000, quota=10_000)
    bob = create_client(server, "bob", budget=1000, quota=0)
    train_x, train_y = sample("mnist-embedded:target-train", 600, seed=1)
    test_x, test_y = sample("mnist-embedded:test", 200, seed=2)
    with server.client() as http:
        train_id, test_id = (
            upload(http, alice, train_x, train_y),
            upload(http, alice, test_x, test_y),
        )
        public = submit(
            http,
            alice,
            dataset_id=train_id,
            test_dataset_id=test_id,
            recipe={"epochs": 3, "batch_size": 16},
            name="my-lenet",
            publish="public",
            output_policy="probabilities:4",
            detectors={"prada": {"delta": 0.95}, "mi_redundancy": {"window": 20}},
        )
        private = submit(http, alice, dataset_id=test_id, recipe={"epochs": 1}, name="secret")
        job = wait_for(http, alice, public, lambda j: j["status"] == "succeeded")
        assert job["status"] == "succeeded", job
        assert job["model"] == "u/alice/my-lenet" and (job["epoch"], job["epochs"]) == (3, 3)
        assert job["metrics"]["test_size"] == 200
        assert wait_for(http, alice, private, lambda j: j["status"] == "succeeded")["status"] == (
            "succeeded"
        )

        # bob sees the public model, not the private one, and pays for what he asks
        listed = [m["name"] for m in http.get("/v1/models", headers=auth(bob)).json()["models"]]
        assert "u/alice/my-lenet" in listed and "u/alice/secret" not in listed
        answer = predict(http, bob, "u/alice/my-lenet", test_x)
        assert answer.status_code == 200, answer.text
        assert answer.json()["queries_used"] == 200
        hosted_accuracy = float(np.mean(np.array(answer.json()["labels"]) == test_y))
        assert hosted_accuracy == pytest.approx(job["metrics"]["test_accuracy"], abs=1e-6)
        assert hosted_accuracy > 0.6  # about 0.8 after three epochs on 600 digits
        with HttpOracle(server.url, bob, "u/alice/my-lenet") as oracle:  # the attacker's side
            bought = oracle.predict_labels(test_x[:10])
        assert bought.tolist() == answer.json()["labels"][:10]
        hidden = predict(http, bob, "u/alice/secret", test_x[:1])
        assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "unknown_model"
        assert predict(http, alice, "u/alice/secret", test_x[:1]).status_code == 200

        # a job over bob's quota (0) is refused before it starts and charges nothing
        bob_data = upload(http, bob, test_x, test_y)
        refused = http.post(
            "/v1/training-jobs",
            json={"dataset_id": bob_data, "arch": "lenet5", "recipe": "fastest", "name": "x"},
            headers=auth(bob),
        )
        assert refused.status_code == 402 and refused.json()["error"]["code"] == (
            "training_quota_exceeded"
        )
        assert http.get("/v1/training-jobs", headers=auth(bob)).json() == []
        clients = http.get("/v1/admin/clients", headers=server.admin_headers).json()
        bob_view = next(c for c in clients if c["name"] == "bob")
        assert (bob_view["training_used"], bob_view["queries_used"]) == (0, 210)


def test_defender_cli_uploads_trains_and_follows(server: LiveServer, tmp_path: Path) -> None:
    key = create_client(server, "dana", budget=10, quota=10_000)
    x, y = sample("mnist-embedded:target-train", 300, seed=4)
    np.savez(tmp_path / "mine.npz", images=x, labels=y)
    runner = CliRunner()
    common = ["--url", server.url, "--api-key", key]
    uploaded = runner.invoke(
        app, ["upload", *common, "--dataset", str(tmp_path / "mine.npz"), "--name", "digits"]
    )
    assert uploaded.exit_code == 0, uploaded.output
    dataset_id = uploaded.stdout.strip().splitlines()[-1]
    train = ["train", *common, "--dataset-id", dataset_id, "--arch", "lenet5"]
    followed = runner.invoke(
        app,
        [
            *train,
            "--name",
            "cli-model",
            "--recipe",
            '{"epochs": 2}',
            "--publish",
            "public",
            "--output-policy",
            "probabilities:4",
            "--poll",
            "0.2",
        ],
    )
    assert followed.exit_code == 0, followed.output
    assert followed.stdout.strip().splitlines()[-1] == "u/dana/cli-model"
    detached = runner.invoke(app, [*train, "--name", "later", "--detach"])
    assert detached.exit_code == 0, detached.output
    job_id = detached.stdout.strip().splitlines()[-1]
    with server.client() as http:
        job = http.get(f"/v1/training-jobs/{job_id}", headers=auth(key)).json()
        assert job["status"] in ("queued", "running") and job["epochs"] == 3  # fastest
        listed = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
        assert listed["u/dana/cli-model"]["output_policy"] == "probabilities:4"
        http.delete(f"/v1/training-jobs/{job_id}", headers=auth(key))
    refused = runner.invoke(app, [*train, "--name", "cli-model"])  # name taken
    assert refused.exit_code == 1 and "model_name_taken" in refused.output


def worker_pids(state_dir: Path) -> list[int]:
    """Processes running ``train-worker`` on this state directory."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train-worker" in argv and str(state_dir).encode() in argv:
            pids.append(int(proc.name))
    return pids


def test_kill_9_mid_training_resumes_and_completes_exactly_once(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory(**FAST_LEASE)
    key = create_client(server, "carol", budget=100, quota=100_000)
    x, y = sample("mnist-embedded:target-train", 1500, seed=3)
    epochs = 10  # room after the kill: on an idle machine the poll can overshoot epoch 2 by 3
    with server.client() as http:
        dataset = upload(http, key, x, y)
        job_id = submit(http, key, dataset_id=dataset, recipe={"epochs": epochs}, name="sturdy")
        waiting = submit(  # one worker: this one is still queued at the kill
            http,
            key,
            dataset_id=dataset,
            recipe={"epochs": 1},
            name="next",
        )
        job = wait_for(http, key, job_id, lambda j: j["epoch"] >= 2)
        assert job["status"] == "running" and job["epoch"] < epochs, job
        assert http.get(f"/v1/training-jobs/{waiting}", headers=auth(key)).json()["status"] == (
            "queued"
        )
    workers = worker_pids(server.state_dir)
    assert workers, "no training worker process"
    assert server.process is not None and server.process.pid not in workers  # not the API
    server.kill(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers):  # they follow their parent
        assert time.monotonic() < deadline, f"workers {workers} outlived the killed service"
        time.sleep(0.1)
    with sqlite3.connect(server.state_path) as db:
        status, killed_at = db.execute(
            "SELECT status, epoch FROM training_jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
    assert status == "running" and 2 <= killed_at < epochs - 1  # epochs left to resume

    server.start()
    with server.client() as http:
        job = wait_for(http, key, job_id, lambda j: j["status"] == "succeeded")
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2 and job["epoch"] == epochs
        assert job["image_epochs"] == 1500 * epochs
        answer = predict(http, key, "u/carol/sturdy", x[:20])
        assert answer.status_code == 200, answer.text
        queued_job = wait_for(http, key, waiting, lambda j: j["status"] == "succeeded")
        assert queued_job["status"] == "succeeded" and queued_job["attempts"] == 1
    with sqlite3.connect(server.state_path) as db:
        log = db.execute(
            "SELECT epoch, attempt FROM training_epochs WHERE job_id = ? ORDER BY epoch",
            (job_id,),
        ).fetchall()
        ledger = db.execute(
            "SELECT image_epochs FROM training_ledger WHERE job_id = ?", (job_id,)
        ).fetchall()
    assert [epoch for epoch, _ in log] == list(range(1, epochs + 1))  # each epoch once
    assert {attempt for epoch, attempt in log if epoch > killed_at + 1} == {
        2
    }  # resumed, not redone
    assert {attempt for epoch, attempt in log if epoch <= killed_at} == {1}
    assert ledger == [(1500 * epochs,)]  # charged once
    assert os.path.exists(server.state_dir / "models" / f"{job_id}.pt")


def test_a_dead_worker_is_replaced_and_its_job_resumed(server: LiveServer) -> None:
    key = create_client(server, "erin", budget=10, quota=100_000)
    x, y = sample("mnist-embedded:target-train", 800, seed=5)
    with server.client() as http:
        dataset = upload(http, key, x, y)
        job_id = submit(http, key, dataset_id=dataset, recipe={"epochs": 5}, name="phoenix")
        job = wait_for(http, key, job_id, lambda j: j["epoch"] >= 1)
        assert job["status"] == "running" and job["epoch"] < 5, job
        workers = worker_pids(server.state_dir)
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        job = wait_for(http, key, job_id, lambda j: j["status"] == "succeeded")
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        assert server.running  # the API process never stopped
    replacement = worker_pids(server.state_dir)
    assert len(replacement) == 1 and replacement != workers
