"""The guide contract of ``Selector``: a strategy declares what it needs beside the pool
(class probabilities or activation patterns) and ``__call__`` checks it before ``run``."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest

from attacker.selection import GuideKind, Selection, SelectionResult, Selector


class Echo(Selector):
    """Takes the first k indices and remembers the guide ``run`` received."""

    def __init__(self, kind: GuideKind | None) -> None:
        self.kind = kind
        self.seen: np.ndarray | None = None

    @property
    def params(self) -> dict[str, Any]:
        return {}

    def run(
        self, images: np.ndarray, labels: np.ndarray, *, k: int, guide: np.ndarray | None
    ) -> SelectionResult:
        self.seen = guide
        return SelectionResult(indices=np.arange(k), per_class={})


def guided(kind: GuideKind | None) -> Echo:
    class Guided(Echo):
        guide: ClassVar[GuideKind | None] = kind

    return Guided(kind)


POOL = np.zeros((4, 2, 2), dtype=np.uint8)
LABELS = np.array([0, 1, 2, 1])
PROBABILITIES = np.full((4, 3), 1 / 3, dtype=np.float32)


def test_guides_reach_run_validated() -> None:
    selector = guided("probabilities")
    selector(POOL, LABELS, k=2, guide=PROBABILITIES)
    assert selector.seen is not None and selector.seen.dtype == np.float64
    np.testing.assert_allclose(selector.seen, 1 / 3, rtol=1e-6)
    activations = guided("activations")
    patterns = np.array([[True, False], [False, False], [True, True], [False, True]])
    activations(POOL, LABELS, k=2, guide=patterns)
    assert activations.seen is not None and activations.seen.tolist() == patterns.tolist()
    unguided = guided(None)
    unguided(POOL, LABELS, k=2)
    assert unguided.seen is None


@pytest.mark.parametrize(
    ("kind", "guide", "message"),
    [
        ("probabilities", None, "needs a guide: class probabilities .* none was given"),
        ("activations", None, "needs a guide: activation patterns .* none was given"),
        (None, PROBABILITIES, r"takes no guide, got one of shape \(4, 3\)"),
        ("probabilities", PROBABILITIES[:3], r"n=4, got shape \(3, 3\)"),
        ("probabilities", PROBABILITIES[:, 0], r"got shape \(4,\)"),
        ("activations", np.zeros((4, 0)), r"got shape \(4, 0\)"),
        ("probabilities", np.ones((4, 3), dtype=np.int64), "must be floats, got dtype int64"),
        ("probabilities", np.full((4, 3), 1.5), r"lie in \[0, 1\], got 1.5..1.5"),
        ("probabilities", np.full((4, 3), np.nan), "NaN or inf"),
        ("activations", np.array([["a"]] * 4), "must be numeric"),
        ("probabilities", np.full((4, 2), 0.5), "labels span 0..2 but the guide has .* 2 classes"),
    ],
)
def test_bad_guides_are_refused_naming_what_is_wrong(
    kind: GuideKind | None, guide: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        guided(kind)(POOL, LABELS, k=2, guide=guide)


def test_selection_file_records_the_guide(tmp_path: Any) -> None:
    result = SelectionResult(indices=np.array([0, 2]), per_class={0: {"k": 1, "n": 1}})
    guide = {"kind": "probabilities", "source": "model", "checkpoint": "sub.pt"}
    selection = Selection.from_result(result, pool="p", method="hcp", params={}, guide=guide)
    loaded = Selection.load(selection.save(tmp_path / "s.json"))
    assert loaded.guide == guide
    plain = Selection.from_result(result, pool="p", method="random", params={"seed": 0})
    assert Selection.load(plain.save(tmp_path / "r.json")).guide is None
