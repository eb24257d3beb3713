"""Query selection: which pool images an attacker spends its query budget on.

``make_selector("drmi", alpha=2.0)`` builds a strategy by name; calling it on a labelled pool
returns the chosen indices. A strategy whose ``guide`` is not None also needs what a model says
about the pool (``guide=``; see ``attacker.selection.guides``). Add a strategy by subclassing
``Selector`` and registering it in ``SELECTORS``.
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
from attacker.selection.class_probability import HcpSelector, LcpSelector
from attacker.selection.cmal import CmalSelector
from attacker.selection.drmi import DrmiSelector, SubsetResult, drmi_subset, subset_weight
from attacker.selection.kmeans import KMeansSelector, PcaKMeansSelector
from attacker.selection.knockoff import KnockoffRandomSelector
from attacker.selection.random import RandomSelector
from attacker.selection.trace import TraceMaxSelector, TraceMinSelector

__all__ = [
    "GUIDE_KINDS",
    "SELECTORS",
    "CmalSelector",
    "DrmiSelector",
    "GuideKind",
    "HcpSelector",
    "InvalidSelectionFile",
    "KMeansSelector",
    "LcpSelector",
    "PcaKMeansSelector",
    "RandomSelector",
    "Selection",
    "SelectionResult",
    "Selector",
    "SubsetResult",
    "TraceMaxSelector",
    "TraceMinSelector",
    "drmi_subset",
    "make_selector",
    "split_budget",
    "subset_weight",
]

SELECTORS: dict[str, type[Selector]] = {
    "drmi": DrmiSelector,
    "random": RandomSelector,
    # the DRMI paper's comparison strategies (Section 5.4, Tables 11-13)
    "cmal": CmalSelector,
    "hcp": HcpSelector,
    "lcp": LcpSelector,
    "kmeans": KMeansSelector,
    "pca-kmeans": PcaKMeansSelector,
    "trace-min": TraceMinSelector,
    "trace-max": TraceMaxSelector,
    # Knockoff Nets' random strategy (its adaptive one buys in rounds: selection/online.py)
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
