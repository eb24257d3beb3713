"""Tables 1-2 figures: set sizes shrink as the threshold rises, each row carries both epochs and
the sanitised model's clean accuracy, and a threshold that leaves too few images says so."""

from __future__ import annotations

from defenses.sanitization.tables import sanitization_table
from tests.defenses.sanitization.conftest import PARENT_EPOCHS


def test_self_table_rows_per_threshold(parent_path, tmp_path):
    rows, canonical = sanitization_table(
        parent_path, method="self", out_dir=tmp_path, thresholds=(0.5, 0.9, 0.9999999), epochs=1
    )
    assert canonical is None
    assert [row["threshold"] for row in rows] == [0.5, 0.9, 0.9999999]
    kept = [row["kept"] for row in rows]
    assert 2500 >= kept[0] >= kept[1] >= kept[2]
    for row in rows[:2]:
        assert (row["parent_epochs"], row["sanitized_epochs"]) == (PARENT_EPOCHS, 1)
        assert 0.1 < row["clean_accuracy"] <= 1
    assert rows[2]["clean_accuracy"] is None
    assert f"too few images left: {kept[2]} of 2500" in rows[2]["note"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "lenet5-mnist.sanitized-self-0.5.pt",
        "lenet5-mnist.sanitized-self-0.9.pt",
    ]
