"""Rows 3 and 6 of ``benchmarks/unlearnable.py`` against a real ``target-service serve`` started
as the benchmark starts it: a set uploaded and trained through the training-jobs API gives one
row per recipe scored on the hosted model, and stealing from a pool pays exactly k queries per
(selection, k) and writes accuracy, agreement, transferability and MI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from benchmarks.unlearnable import load_data
from benchmarks.unlearnable_service import (
    TARGET,
    Service,
    as_dataset,
    hosted_labels,
    save_npz,
    start_service,
    stealing_rows,
    training_api_rows,
)
from mlcore.client import ServiceClient, read_prediction
from mlcore.datasets import balanced_subset_indices

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def service(
    trained_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    server = start_service(trained_checkpoints, tmp_path_factory.mktemp("unlearnable-service"))
    try:
        yield Service(server.url, server.admin_token)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """100 balanced pool images as an upload-format npz, and 200 clean test images."""
    data, _ = load_data(None, 100)
    npz = save_npz(tmp_path_factory.mktemp("tiny") / "pool.npz", data["images"], data["labels"])
    index = balanced_subset_indices(data["test_labels"], 200, seed=0)
    test = as_dataset("test", data["test_images"][index], data["test_labels"][index])
    return npz, test


def test_row3_writes_one_row_per_recipe_scored_on_the_hosted_model(service: Service, tiny) -> None:
    npz, test = tiny
    key = service.open_account("row3-owner")
    rows = training_api_rows(
        service, key, npz, test, recipes=["fastest", "standard"], seed=0, name="row3", poll=0.2
    )
    assert [row["variant"] for row in rows] == ["fastest", "standard"]
    assert [row["recipe_epochs"] for row in rows] == [3, 15]
    assert all(row["train_images"] == 100 for row in rows)
    with ServiceClient(service.url, key) as customer:
        for row in rows:
            assert row["model"] == f"u/row3-owner/row3-{row['variant']}"
            answer = read_prediction(customer.predict(row["model"], test.images.numpy()).body)
            again = float(np.mean(np.array(answer.labels) == test.labels.numpy()))
            assert row["value"] == pytest.approx(again)  # the hosted model's own accuracy
    # 15 epochs on 100 digits: well above chance (10%), far from a trained target
    assert rows[1]["value"] > 0.3, rows


def test_row6_pays_exactly_k_per_selection_and_writes_every_field(service: Service, tiny) -> None:
    npz, test = tiny
    key = service.open_account("row6-thief")
    target_labels = hosted_labels(service, service.open_account("row6-judge"), TARGET, test)
    rows = stealing_rows(
        service, key, npz, test, target_labels,
        ks=[40, 20, 100], selections=["random", "drmi"], epochs=1, transfer_seeds=2, seed=0,
    )  # fmt: skip
    assert [(row["selection"], row["k"]) for row in rows] == [
        ("random", 20), ("random", 40), ("random", 100), ("drmi", 20), ("drmi", 40), ("drmi", 100),
    ]  # fmt: skip
    # k = the whole pool: both selections pick every image in the same order, so DRMI's
    # substitute is random's, copied and not bought twice
    whole_random, whole_drmi = rows[2], rows.pop()
    assert whole_drmi["same_as"] == "random k=100" and whole_drmi["variant"] == "drmi k=100"
    assert whole_drmi["queries_paid"] == whole_drmi["transfer_queries"] == 0
    for field in ("value", "agreement", "transferability_all", "selected_mi"):
        assert whole_drmi[field] == whole_random[field], field
    for row in rows:
        assert row["queries_paid"] == row["k"] and row["stopped_by"] is None, row
        assert row["transfer_examples"] == 2 * 9 == row["transfer_queries"], row
        for field in ("value", "agreement", "transferability_all"):
            assert 0.0 <= row[field] <= 1.0, (field, row)
        assert row["selected_mi"] > 0 and row["pool_mi"] > 0, row
    assert len({row["pool_mi"] for row in rows}) == 1  # one pool
    # the service's own count: every label and every transfer example was charged once
    with ServiceClient(service.url, key) as thief:
        answer = read_prediction(thief.predict(TARGET, test.images[:1].numpy()).body)
    paid = sum(row["queries_paid"] + row["transfer_queries"] for row in rows)
    assert answer.queries_used == paid + 1
