"""The input defence in a real server (issue 9, item 3): a ``framework`` target rejects crafted
adversarial images, the responses and the admin view show it, the rejected-share alarm fires,
``block`` then refuses the client, and all of it survives a ``kill -9``.

The target is trained and its sanitised twin built by ``target-service train`` (5 epochs: a
LeNet-5 trained one epoch is too unsure of its own training images for self-sanitisation at 0.99
to keep enough of them). The adversarial images are targeted PGD (L-inf eps 0.5, 40 steps) on a
local copy of the target: what an attacker who stole the model exactly would send.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx2
import numpy as np
import pytest
import torch

from mlcore.adversarial import PGD
from mlcore.checkpoints import load_checkpoint
from mlcore.datasets import load_dataset
from mlcore.training import predict_labels
from target_service.testing import LiveServer, admin_create_client, target_env
from tests.e2e.test_detection_e2e import admin, predict

pytestmark = pytest.mark.e2e

MODEL = "lenet5-mnist"
DEFENCE = {
    "kind": "kl-sanitized",
    "mode": "framework",
    "method": "self",
    "threshold": 0.99,
    "pass_rate": 0.9,
    "alarm_window": 20,
    "alarm_share": 0.5,  # 10 of the last 20 images rejected
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``target-service train`` with the defence configured: the target and its twin."""
    folder = tmp_path_factory.mktemp("defended")
    env = target_env({"models": [MODEL], "input_defenses": {MODEL: DEFENCE}})
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run(
        [sys.executable, "-m", "target_service.cli", "train", "-m", MODEL, "--epochs", "5",
         "--calibration-clients", "0", "--checkpoint-dir", str(folder)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "sanitised twin (self, threshold 0.99) built" in run.stdout, run.stdout
    assert (folder / f"{MODEL}.sanitized-self.pt").is_file()
    return folder


def adversarial_examples(checkpoint: Path, images: np.ndarray) -> np.ndarray:
    """Targeted PGD (label + 1) on a local copy of the target, quantised to uint8; only the
    examples that fool that copy, as a transfer attack sends them."""
    model = load_checkpoint(checkpoint).model
    x = torch.from_numpy(images).float() / 255.0
    target = (predict_labels(model, x) + 1) % 10
    adversarial = PGD(norm="linf", eps=0.5, steps=40)(model, x, target=target)
    quantised = (adversarial * 255).round().to(torch.uint8)
    fooled = predict_labels(model, quantised) == target
    return quantised[fooled].numpy()


def test_framework_target_rejects_adversarial_images_alarms_and_blocks(
    checkpoints: Path, live_server_factory: Callable[..., LiveServer]
) -> None:
    server = live_server_factory(
        checkpoint_dir=checkpoints,
        input_defenses={MODEL: DEFENCE},
        detectors={MODEL: {}},  # only the input defence watches
        alarm_policies={MODEL: "block"},
    )
    pool = load_dataset("mnist-embedded:pool").images.numpy()
    normal_id, normal_key = admin_create_client(server, "normal", budget=1000)
    attacker_id, attacker_key = admin_create_client(server, "attacker", budget=1000)

    # a normal client: few rejections, no alarm
    normal_rejected = 0
    for start in range(0, 60, 20):
        body = predict(server, normal_key, pool[start : start + 20]).json()
        assert [i for i, label in enumerate(body["labels"]) if label is None] == body["rejected"]
        normal_rejected += len(body["rejected"])
    assert normal_rejected <= 12  # 20% of 60; the threshold lets 90% of normal images through

    # the attacker: adversarial batches until the service refuses
    adversarial = adversarial_examples(checkpoints / f"{MODEL}.pt", pool[100:200])
    assert len(adversarial) >= 60, "the local PGD did not fool the local copy"
    answered, rejected, refused = 0, 0, None
    for start in range(0, len(adversarial), 10):
        response = predict(server, attacker_key, adversarial[start : start + 10])
        if response.status_code != 200:
            refused = response
            break
        body = response.json()
        assert body["charged"] == len(body["labels"])  # rejected images are charged
        assert [i for i, label in enumerate(body["labels"]) if label is None] == body["rejected"]
        answered += body["charged"]
        rejected += len(body["rejected"])

    assert refused is not None, f"never refused: {rejected} of {answered} rejected"
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "blocked"
    assert rejected >= 10 and rejected / answered > 3 * normal_rejected / 60
    view = admin(server, f"/v1/admin/clients/{attacker_id}")
    defence = view["input_defenses"][MODEL]
    assert view["queries_used"] == answered  # the refused batch was not charged
    assert (defence["images"], defence["rejected"]) == (answered, rejected)
    assert defence["rejected"] == defence["flagged"]  # framework: every flagged image rejected
    assert defence["first_alarm_at"] is not None and defence["first_alarm_at"] <= answered
    assert defence["recent_score_max"] > defence["score_threshold"]
    assert view["blocked_on"] == [MODEL]
    normal_view = admin(server, f"/v1/admin/clients/{normal_id}")
    assert normal_view["input_defenses"][MODEL]["rejected"] == normal_rejected
    assert normal_view["input_defenses"][MODEL]["first_alarm_at"] is None
    assert normal_view["blocked_on"] == []
    alarms = admin(server, "/v1/admin/alarms")
    assert [(a["client_id"], a["detector"], a["query_index"]) for a in alarms] == [
        (attacker_id, "kl-sanitized", defence["first_alarm_at"])
    ]
    metrics = httpx2.get(f"{server.url}/metrics", headers=server.admin_headers).text
    assert (
        f'mlaas_input_rejected_total{{model="{MODEL}"}} {float(rejected + normal_rejected)}'
        in metrics
    )
    assert f'mlaas_alarms_total{{detector="kl-sanitized",model="{MODEL}"}} 1.0' in metrics

    server.kill(signal.SIGKILL)
    server.start()
    assert admin(server, f"/v1/admin/clients/{attacker_id}")["input_defenses"][MODEL] == defence
    assert admin(server, "/v1/admin/alarms") == alarms
    again = predict(server, attacker_key, pool[:5])
    assert again.status_code == 403 and again.json()["error"]["code"] == "blocked"
    assert predict(server, normal_key, pool[:5]).status_code == 200
