"""The random baseline: a class-proportional uniform sample of the pool (DRMI paper's baseline)."""

from __future__ import annotations

from typing import Any

import numpy as np

from attacker.selection.base import SelectionResult, Selector, check_int, split_budget

__all__ = ["RandomSelector"]


class RandomSelector(Selector):
    """Uniform sample without replacement within each class, k split in proportion to class size.

    Proportional (not even) so the sample has the pool's class balance, as a plain random sample
    would on average; the seed makes it repeatable.
    """

    def __init__(self, *, seed: int) -> None:
        self.seed = check_int("seed", seed)

    @property
    def params(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def run(
        self, images: np.ndarray, labels: np.ndarray, *, k: int, guide: np.ndarray | None = None
    ) -> SelectionResult:
        rng = np.random.default_rng(self.seed)
        classes, counts = np.unique(labels, return_counts=True)
        budget = split_budget(
            {int(c): int(n) for c, n in zip(classes, counts, strict=True)}, k, proportional=True
        )
        chosen: list[np.ndarray] = []
        per_class: dict[int, dict[str, Any]] = {}
        for c, k_c in budget.items():
            members = np.flatnonzero(labels == c)
            chosen.append(rng.choice(members, size=k_c, replace=False))
            per_class[c] = {"k": k_c, "n": len(members)}
        return SelectionResult(indices=np.sort(np.concatenate(chosen)), per_class=per_class)
