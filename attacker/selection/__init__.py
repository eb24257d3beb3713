"""Query selection: which pool images an attacker spends its query budget on.

``make_selector("drmi", alpha=2.0)`` builds a strategy by name; calling it on a labelled pool
returns the chosen indices. Add a strategy by subclassing ``Selector`` and registering it in
``SELECTORS``.
"""

from __future__ import annotations

from typing import Any

from attacker.selection.base import (
    GUIDE_KINDS,
    GuideKind,
    InvalidSelectionFile,
    Selection,
    SelectionResult,
    Selector,
    split_budget,
)
from attacker.selection.drmi import DrmiSelector, SubsetResult, drmi_subset, subset_weight
from attacker.selection.knockoff import KnockoffRandomSelector
from attacker.selection.random import RandomSelector

__all__ = [
    "GUIDE_KINDS",
    "SELECTORS",
    "DrmiSelector",
    "GuideKind",
    "InvalidSelectionFile",
    "RandomSelector",
    "Selection",
    "SelectionResult",
    "Selector",
    "SubsetResult",
    "drmi_subset",
    "make_selector",
    "split_budget",
    "subset_weight",
]

SELECTORS: dict[str, type[Selector]] = {
    "drmi": DrmiSelector,
    "random": RandomSelector,
    "knockoff-random": KnockoffRandomSelector,
}


def make_selector(method: str, **params: Any) -> Selector:
    """The selector registered as ``method``, built with ``params`` (keyword arguments)."""
    try:
        selector_class = SELECTORS[method]
    except (KeyError, TypeError):
        known = ", ".join(sorted(SELECTORS))
        raise ValueError(f"unknown selection method {method!r}; known: {known}") from None
    try:
        return selector_class(**params)
    except TypeError as exc:  # e.g. a misspelt parameter name
        raise ValueError(f"bad parameters for selection method {method!r}: {exc}") from exc
