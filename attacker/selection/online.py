"""Strategies that need the oracle while they choose: the adaptive methods by name, and the
online guide of a guided selector.

``make_adaptive("knockoff-adaptive", rounds=10, seed_fraction=0.1, seed=0)`` builds an
``AdaptiveStrategy`` for ``run_rounds``. A guided selector (``Selector.guide`` set) run against a
live target gets its guide in one of two ways, and the report says which (``guide_source``):

- ``"target"``: the target's output policy returns probabilities and the selector wants
  probabilities. The pool is sent to the target once (one query per pool image, all paid and
  counted) and the labels the selection trains on are those answers' argmax: nothing is bought
  twice. This is the DRMI paper's setting for HCP / LCP and the K-means variants.
- ``"seed-model"``: otherwise. A random, class-proportional seed round of ``seed_fraction`` of k
  is bought, the attacker's own model is trained on it, its probabilities (or activations) of
  the rest of the pool are the guide, and the selector chooses the other labels from the rest:
  k labels in all, exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attacker.selection.activethief import ActiveThief
from attacker.selection.base import Selector
from attacker.selection.guides import activations_from_model, probabilities_from_model
from attacker.selection.knockoff import KnockoffAdaptive
from attacker.selection.random import RandomSelector
from attacker.selection.rounds import AdaptiveStrategy, RoundState, seed_size

__all__ = [
    "ADAPTIVE_METHODS",
    "GuidedRounds",
    "OnlineMethod",
    "build_online",
    "check_guide_source",
    "is_online",
    "make_adaptive",
    "select_with_target_guide",
]

ADAPTIVE_METHODS: dict[str, Callable[..., AdaptiveStrategy]] = {
    "knockoff-adaptive": lambda *, rounds, seed_fraction, seed: KnockoffAdaptive(
        rounds=rounds, seed=seed
    ),
    "activethief-entropy": lambda *, rounds, seed_fraction, seed: ActiveThief(
        criterion="entropy", rounds=rounds, seed_fraction=seed_fraction, seed=seed
    ),
    "activethief-kcenter": lambda *, rounds, seed_fraction, seed: ActiveThief(
        criterion="kcenter", rounds=rounds, seed_fraction=seed_fraction, seed=seed
    ),
}


def make_adaptive(method: str, *, rounds: int, seed_fraction: float, seed: int) -> AdaptiveStrategy:
    """The adaptive strategy registered as ``method``; ValueError naming a bad value."""
    if method not in ADAPTIVE_METHODS:
        known = ", ".join(sorted(ADAPTIVE_METHODS))
        raise ValueError(f"unknown adaptive method {method!r}; known: {known}")
    return ADAPTIVE_METHODS[method](rounds=rounds, seed_fraction=seed_fraction, seed=seed)


def is_online(method: str) -> bool:
    """Whether ``method`` needs the target while it chooses: an adaptive method, or a guided
    selector (its guide comes from the target or from a bought seed round)."""
    from attacker.selection import SELECTORS

    return method in ADAPTIVE_METHODS or (
        method in SELECTORS and SELECTORS[method].guide is not None
    )


@dataclass(frozen=True)
class OnlineMethod:
    """How an online method runs: ``strategy`` through ``run_rounds``, or (the ``"target"``
    guide source) ``selector`` with ``select_with_target_guide``."""

    method: str
    params: dict[str, Any]
    strategy: AdaptiveStrategy | None
    selector: Selector | None
    guide_source: str | None  # "target" | "seed-model" for a guided selector, else None


def build_online(
    method: str,
    *,
    k: int,
    selector_params: dict[str, Any],
    rounds: int,
    seed_fraction: float,
    seed: int,
    target_probabilities: bool,
) -> OnlineMethod:
    """A fresh, checked online method for a budget of ``k`` (a strategy learns as it runs, so
    build one per run): ValueError naming the value when it cannot run, before a label is
    bought."""
    from attacker.selection import make_selector

    if method in ADAPTIVE_METHODS:
        strategy = make_adaptive(method, rounds=rounds, seed_fraction=seed_fraction, seed=seed)
        strategy.round_sizes(k)
        return OnlineMethod(method, strategy.params, strategy, None, None)
    selector = make_selector(method, **selector_params)
    source = check_guide_source(
        method, selector, target_probabilities=target_probabilities, seed_fraction=seed_fraction
    )
    if source == "target":
        return OnlineMethod(method, selector.params, None, selector, source)
    guided = GuidedRounds(method, selector, seed_fraction=seed_fraction, seed=seed)
    guided.round_sizes(k)
    return OnlineMethod(method, guided.params, guided, selector, source)


def check_guide_source(
    method: str, selector: Selector, *, target_probabilities: bool, seed_fraction: float
) -> str:
    """``"target"`` or ``"seed-model"`` for a guided selector online (see the module docstring);
    ValueError, before any label is bought, when neither is possible."""
    if selector.guide == "probabilities" and target_probabilities:
        return "target"
    if seed_fraction == 0.0:
        why = (
            "the target answers labels only"
            if selector.guide == "probabilities"
            else "its activations come from the attacker's own model"
        )
        raise ValueError(
            f"{method} needs {selector.guide} and {why}: give it a seed budget "
            f"(--seed-fraction > 0), got --seed-fraction {seed_fraction}"
        )
    return "seed-model"


class GuidedRounds(AdaptiveStrategy):
    """A guided selector with its guide from the attacker's own model: a random seed round, then
    one guided round over the rest of the pool."""

    def __init__(self, method: str, selector: Selector, *, seed_fraction: float, seed: int) -> None:
        if selector.guide is None:
            raise ValueError(f"{method} takes no guide: select it offline")
        check_guide_source(
            method, selector, target_probabilities=False, seed_fraction=seed_fraction
        )
        self.method, self.selector = method, selector
        self.seed_fraction, self.seed = float(seed_fraction), int(seed)
        self._per_class: dict[int, dict[str, Any]] = {}

    @property
    def params(self) -> dict[str, Any]:
        return {**self.selector.params, "seed_fraction": self.seed_fraction}

    def round_sizes(self, k: int) -> list[int]:
        seed = seed_size(k, self.seed_fraction)
        if seed >= k:
            raise ValueError(
                f"--seed-fraction {self.seed_fraction} leaves no labels for {self.method} "
                f"to choose at k={k} (the seed round takes {seed})"
            )
        return [seed, k - seed]

    def choose(self, state: RoundState, size: int) -> np.ndarray:
        images, labels = state.pool.images.numpy(), state.pool.labels.numpy()
        if state.substitute is None:  # the seed round
            return RandomSelector(seed=self.seed)(images, labels, k=size).indices
        left = state.unbought()
        guide = model_guide(
            self.selector, state.substitute, state.pool.images[torch.as_tensor(left)]
        )
        result = self.selector(images[left], labels[left], k=size, guide=guide)
        self._per_class = result.per_class
        return left[result.indices]

    def summary(self) -> dict[str, Any]:
        return {
            "guide_source": "seed-model",
            "per_class": {str(c): v for c, v in self._per_class.items()},
        }


def model_guide(selector: Selector, model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """The guide ``selector`` needs, computed from the attacker's own ``model``."""
    if selector.guide == "probabilities":
        return probabilities_from_model(model, images)
    return activations_from_model(model, images)


def select_with_target_guide(
    oracle: Any, images: np.ndarray, labels: np.ndarray, selector: Selector, *, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``"target"`` guide source: the target's probabilities of the whole pool (one paid
    query per image) guide ``selector``; returns (chosen pool indices, the target's labels for
    them, the argmax of its answers)."""
    probabilities = np.asarray(oracle.predict_probabilities(images), dtype=np.float64)
    result = selector(images, labels, k=k, guide=probabilities)
    return result.indices, probabilities[result.indices].argmax(axis=1)
