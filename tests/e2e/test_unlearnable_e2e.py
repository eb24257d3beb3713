"""A data owner's protection against a training platform, through a real ``target-service
serve`` process: ``defender protect`` adds class-wise error-minimising noise to a small set,
``defender upload`` and ``defender train`` train LeNet-5 on it and on the clean set, and the
hosted model trained on the protected set answers the clean test images far worse."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from defenses.cli import app
from target_service.testing import LiveServer
from tests.e2e.test_training_e2e import FAST_LEASE, auth, create_client, predict, sample

pytestmark = pytest.mark.e2e

RECIPE = '{"epochs": 3, "batch_size": 32, "seed": 0}'


@pytest.fixture(scope="module")
def server(module_server_factory: Callable[..., LiveServer]) -> LiveServer:
    return module_server_factory(**FAST_LEASE)


def upload_and_train(runner: CliRunner, common: list[str], path: Path, name: str) -> str:
    uploaded = runner.invoke(app, ["upload", *common, "--dataset", str(path), "--name", name])
    assert uploaded.exit_code == 0, uploaded.output
    dataset_id = uploaded.stdout.strip().splitlines()[-1]
    trained = runner.invoke(
        app,
        ["train", *common, "--dataset-id", dataset_id, "--arch", "lenet5", "--name", name,
         "--recipe", RECIPE, "--poll", "0.2"],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    return trained.stdout.strip().splitlines()[-1]


def test_a_protected_upload_trains_a_much_worse_hosted_model(
    server: LiveServer, tmp_path: Path
) -> None:
    key = create_client(server, "owner", budget=1000, quota=100_000)
    train_x, train_y = sample("mnist-embedded:target-train", 1000, seed=5)
    test_x, test_y = sample("mnist-embedded:test", 300, seed=6)
    np.savez(tmp_path / "clean.npz", images=train_x, labels=train_y)
    runner = CliRunner()
    protected = tmp_path / "protected.npz"
    made = runner.invoke(
        app,
        ["protect", "--method", "em-classwise", "--images", f"npz:{tmp_path / 'clean.npz'}",
         "--eps", "32/255", "--seed", "0", "-o", str(protected)],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    common = ["--url", server.url, "--api-key", key]
    clean_model = upload_and_train(runner, common, tmp_path / "clean.npz", "clean")
    protected_model = upload_and_train(runner, common, protected, "protected")
    scores = {}
    with server.client() as http:
        for model in (clean_model, protected_model):
            answer = predict(http, key, model, test_x)
            assert answer.status_code == 200, answer.text
            scores[model] = float(np.mean(np.array(answer.json()["labels"]) == test_y))
        assert http.get("/v1/models", headers=auth(key)).status_code == 200
    # about 0.9 clean; the margin is argued in tests/defenses/test_unlearnable.py
    assert scores[clean_model] > 0.8, scores
    assert scores[protected_model] < scores[clean_model] - 0.3, scores
