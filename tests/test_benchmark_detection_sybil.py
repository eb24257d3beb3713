"""The detection benchmark's Sybil rows (issue 14, item 5): per-account detectors against one
detector over the union of the accounts' queries, in the order the accounts send them."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.detection import sybil_row
from tests.e2e.test_detection_e2e import synthetic_steps

PRADA = {"delta": 0.95}


@pytest.fixture(scope="module")
def jbda_like() -> tuple[np.ndarray, np.ndarray]:
    stream = np.concatenate(synthetic_steps(40, size=10))
    labels = np.random.default_rng(0).integers(0, 10, len(stream))
    return stream, labels


def test_one_account_is_its_own_union(jbda_like: tuple[np.ndarray, np.ndarray]) -> None:
    row = sybil_row("prada", PRADA, *jbda_like, accounts=1, request=10)
    first = row["first_account_alarm"]
    assert row["accounts_flagged"] == 1 and first is not None
    assert first["account_queries"] == first["total_queries"] == row["union_first_alarm"]


def test_twenty_accounts_hide_from_per_account_detectors_not_from_the_union(
    jbda_like: tuple[np.ndarray, np.ndarray],
) -> None:
    row = sybil_row("prada", PRADA, *jbda_like, accounts=20, request=10)
    assert row["accounts_flagged"] == 0 and row["first_account_alarm"] is None  # 20 queries each
    assert row["union_first_alarm"] is not None and row["union_first_alarm"] <= 400
