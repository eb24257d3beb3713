"""JbDA spends exactly its budget, doubles its set each round, and stops cleanly at 402/403
(after a 402, what is left of the budget is spent, as every attack does)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacker.jbda import jacobian_step, jbda_extract
from attacker.oracle import Blocked, BudgetExhausted, LocalOracle
from mlcore.architectures import build_model
from mlcore.datasets import load_dataset


class CappedOracle(LocalOracle):
    """Answers until ``cap`` queries, then refuses a whole batch with ``error``."""

    def __init__(self, cap: int, error: type[BudgetExhausted] | type[Blocked]) -> None:
        super().__init__(build_model("dnn5"))
        self.cap, self.error, self.batches = cap, error, []

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        self.batches.append(len(images))
        if self.meter.paid + len(images) > self.cap:
            raise self.error("refused", np.full(len(images), -1, dtype=np.int64))
        return super().predict_labels(images)


@pytest.fixture(scope="module")
def pool():
    return load_dataset("mnist-embedded:pool")


def test_spends_exactly_k_doubling_each_round(pool) -> None:
    oracle = CappedOracle(10_000, BudgetExhausted)
    result = jbda_extract(oracle, pool, k=250, arch="dnn5", seed_size=100, epochs_per_round=1)
    assert oracle.batches == [100, 100, 50]
    assert result.queries_bought == oracle.meter.paid == 250
    assert result.stopped_by is None
    assert len(np.unique(pool.labels[torch.as_tensor(result.indices)])) == 10  # class-spread seeds


@pytest.mark.parametrize(
    ("error", "stopped_by", "bought"),
    [(BudgetExhausted, "budget", 150), (Blocked, "blocked", 100)],
)
def test_a_refusal_keeps_what_was_bought_and_says_why(pool, error, stopped_by, bought) -> None:
    oracle = CappedOracle(150, error)
    result = jbda_extract(oracle, pool, k=400, arch="dnn5", epochs_per_round=1)
    assert result.queries_bought == bought == oracle.meter.paid  # a 402 leaves no budget unspent
    assert result.stopped_by == stopped_by


def test_jacobian_step_moves_every_pixel_by_lambda_inside_the_box() -> None:
    x = torch.full((3, 1, 28, 28), 0.5)
    moved = jacobian_step(build_model("lenet5").eval(), x, torch.tensor([0, 1, 2]), 0.1)
    assert torch.allclose((moved - x).abs()[(moved - x) != 0], torch.tensor(0.1))
    assert moved.min() >= 0 and moved.max() <= 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 50}, "k must be at least seed_size=100, got 50"),
        ({"k": 200, "lam": 0}, "lam must be > 0"),
    ],
)
def test_bad_parameters_name_the_value(pool, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        jbda_extract(CappedOracle(10, BudgetExhausted), pool, **kwargs)
