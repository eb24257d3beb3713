"""Output policies on batches with MIXED predictions (ART's label-only postprocessor marked the
wrong cells for batches larger than one, and its tests only used batch size 1), top-k order,
rounded probabilities, the response schemas as the contract, and policy parsing."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from defenses.output_policies import LabelOnly, RoundedProbabilities, TopK, parse_policy
from mlcore.wire import LabelsResponse, ProbabilitiesResponse, TopKResponse

# every row has a different winner, never its own row index; a full class order per row
ORDERS = [
    [3, 7, 0, 1, 2, 4, 5, 6, 8, 9],
    [0, 9, 8, 7, 6, 5, 4, 3, 2, 1],
    [9, 3, 1, 0, 2, 4, 5, 6, 7, 8],
    [1, 0, 2, 3, 4, 5, 6, 7, 8, 9],
    [7, 0, 5, 6, 4, 3, 2, 1, 9, 8],
    [6, 2, 8, 1, 0, 3, 4, 5, 7, 9],
    [2, 5, 9, 0, 1, 3, 4, 6, 7, 8],
    [8, 1, 3, 0, 2, 4, 5, 6, 7, 9],
]
WINNERS = [order[0] for order in ORDERS]


def logits_from_orders(orders: list[list[int]], *, scale: float = 1.0) -> torch.Tensor:
    """Logits whose descending class order in row i is ``orders[i]``."""
    logits = torch.empty(len(orders), len(orders[0]))
    for row, order in enumerate(orders):
        for rank, cls in enumerate(order):
            logits[row, cls] = scale * (len(order) - rank) + 0.01 * row
    return logits


LOGITS = logits_from_orders(ORDERS)
USAGE = {"charged": 2, "queries_used": 8, "queries_remaining": 92}


def test_mixed_batch_really_is_mixed() -> None:
    assert len(set(WINNERS)) == len(WINNERS)
    assert all(winner != row for row, winner in enumerate(WINNERS))  # the ART pitfall


def test_label_only_marks_the_right_class_in_every_row() -> None:
    answer = LabelOnly().render(LOGITS)
    assert answer == {"labels": WINNERS}
    one_hot = torch.zeros_like(LOGITS)
    one_hot[torch.arange(len(LOGITS)), torch.tensor(answer["labels"])] = 1
    assert torch.equal(one_hot.argmax(dim=1), LOGITS.argmax(dim=1))
    assert one_hot.sum().item() == len(LOGITS)


def test_label_only_is_row_order_equivariant() -> None:
    permutation = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4])  # a derangement of the rows
    answer = LabelOnly().render(LOGITS[permutation])["labels"]
    assert answer == [WINNERS[i] for i in permutation.tolist()]


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_lists_classes_most_likely_first(k: int) -> None:
    answer = TopK(k).render(LOGITS)
    assert answer["top_k"] == [order[:k] for order in ORDERS]
    assert answer["labels"] == WINNERS


def test_top_k_larger_than_the_classes_lists_every_class() -> None:
    answer = TopK(25).render(LOGITS)
    assert answer["top_k"] == ORDERS


@pytest.mark.parametrize("decimals", [0, 1, 2, 4])
def test_rounded_probabilities_are_rounded_and_sum_to_about_one(decimals: int) -> None:
    logits = logits_from_orders(ORDERS, scale=0.7)
    answer = RoundedProbabilities(decimals).render(logits)
    assert answer["labels"] == WINNERS
    probabilities = torch.tensor(answer["probabilities"], dtype=torch.float64)
    exact = torch.softmax(logits.double(), dim=1)
    step = 10.0**-decimals
    assert probabilities.shape == exact.shape
    assert torch.all((probabilities - exact).abs() <= step / 2 + 1e-9)
    assert torch.all((probabilities.sum(dim=1) - 1).abs() <= exact.shape[1] * step / 2 + 1e-9)
    for row in answer["probabilities"]:
        assert all(round(value, decimals) == value for value in row)


def test_rounded_probabilities_hide_small_differences() -> None:
    logits = torch.tensor([[2.0, 2.0001, -5.0]])
    answer = RoundedProbabilities(2).render(logits)
    assert answer["probabilities"][0][0] == answer["probabilities"][0][1]
    assert answer["labels"] == [1]  # the label still comes from the exact logits


@pytest.mark.parametrize(
    ("policy", "model"),
    [(LabelOnly(), LabelsResponse), (TopK(3), TopKResponse), (RoundedProbabilities(2), ProbabilitiesResponse)],
    ids=["label-only", "top-k", "probabilities"],
)  # fmt: skip
def test_each_policy_renders_its_own_response_schema(policy, model) -> None:
    assert policy.response_model is model
    response = policy.response_model(**policy.render(LOGITS), **USAGE)
    assert response.labels == WINNERS
    assert set(response.model_dump()) == set(model.model_fields)


@pytest.mark.parametrize(
    "extra",
    [
        {"probabilities": [[0.1] * 10] * 8},
        {"logits": [[0.0] * 10] * 8},
        {"top_k": [[1, 2]] * 8},
    ],
    ids=["probabilities", "logits", "top_k"],
)
def test_label_only_response_cannot_carry_scores(extra: dict) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        LabelsResponse(**LabelOnly().render(LOGITS), **USAGE, **extra)


def test_top_k_response_cannot_carry_probabilities() -> None:
    with pytest.raises(ValidationError, match="probabilities"):
        TopKResponse(**TopK(2).render(LOGITS), **USAGE, probabilities=[[0.5, 0.5]] * 8)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("label-only", LabelOnly()),
        ("top-k:3", TopK(3)),
        ("top-k:1", TopK(1)),
        ("probabilities:4", RoundedProbabilities(4)),
        ("probabilities", RoundedProbabilities(2)),
    ],
)
def test_parse_policy(spec: str, expected: object) -> None:
    policy = parse_policy(spec)
    assert policy == expected
    assert parse_policy(policy.name) == policy  # the name round-trips


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("top-k:0", r"k >= 1, got 0"),
        ("top-k:-2", r"k >= 1, got -2"),
        ("probabilities:7", r"0\.\.6 decimals, got 7"),
        ("probabilities:-1", r"0\.\.6 decimals, got -1"),
        ("top-k", r"got 'top-k'"),
        ("top-k:three", r"got 'top-k:three'"),
        ("probabilities:x", r"got 'probabilities:x'"),
        ("label-only:2", r"got 'label-only:2'"),
        ("softmax", r"'label-only', 'top-k:K' or 'probabilities:DECIMALS', got 'softmax'"),
        ("", r"got ''"),
    ],
    ids=[
        "k-zero",
        "k-negative",
        "too-many-decimals",
        "negative-decimals",
        "top-k-without-k",
        "top-k-not-a-number",
        "decimals-not-a-number",
        "label-only-with-argument",
        "unknown-kind",
        "empty",
    ],
)
def test_parse_policy_errors_name_the_value(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_policy(spec)
