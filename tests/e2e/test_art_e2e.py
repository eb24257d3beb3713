"""ART's own extraction attacks (KnockoffNets with random sampling, CopycatCNN) against a real
target-service process through ``attacker.art_interop``: every query is paid through our
HttpOracle, and what its meter says was paid is exactly what the server charged."""

from __future__ import annotations

from collections.abc import Callable

import httpx2
import numpy as np
import pytest
from art.attacks.extraction import CopycatCNN, KnockoffNets

from attacker.art_interop import art_substitute, art_victim
from attacker.oracle import HttpOracle
from mlcore.datasets import load_dataset
from target_service.testing import LiveServer, admin_create_client

pytestmark = pytest.mark.e2e


def charged(server: LiveServer, client_id: str) -> int:
    response = httpx2.get(
        f"{server.url}/v1/admin/clients/{client_id}", headers=server.admin_headers
    )
    return response.json()["queries_used"]


@pytest.mark.parametrize(
    ("attack_class", "extra", "stolen"),
    [(KnockoffNets, {"sampling_strategy": "random"}, 60), (CopycatCNN, {}, 40)],
    ids=["knockoff-random", "copycat"],
)
def test_arts_attacks_through_the_adapter_pay_exactly_what_the_server_charged(
    live_server_factory: Callable[..., LiveServer],
    attack_class: type,
    extra: dict,
    stolen: int,
) -> None:
    server = live_server_factory()
    client_id, key = admin_create_client(server, "art", budget=500)
    pool, test = load_dataset("mnist-embedded:pool"), load_dataset("mnist-embedded:test")
    np.random.seed(0)  # ART draws its random queries from numpy's global generator
    with HttpOracle(server.url, key, "lenet5-mnist", batch_size=25) as oracle:
        victim = art_victim(oracle, input_shape=(1, 28, 28), nb_classes=10)
        attack = attack_class(
            victim, batch_size_fit=8, batch_size_query=25, nb_epochs=20, nb_stolen=stolen, **extra
        )
        thief = attack.extract(pool.as_float().numpy(), thieved_classifier=art_substitute(seed=0))
    assert oracle.meter.paid == stolen == charged(server, client_id)
    assert oracle.meter.report()["queries_replayed"] == 0
    accuracy = (thief.predict(test.as_float().numpy()).argmax(axis=1) == test.labels.numpy()).mean()
    assert accuracy > 0.3, accuracy  # it learnt from the target's labels (chance: 0.1)
