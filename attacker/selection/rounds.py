"""Adaptive strategies: buy a batch, learn from the answers, choose the next batch.

A plain ``Selector`` chooses all k images before a label is bought. An adaptive strategy needs
the oracle: it buys in rounds, and each round's choice depends on the labels already bought (and
on a substitute retrained on them). ``run_rounds`` is the one loop every adaptive strategy runs
in (Knockoff Nets adaptive, ActiveThief, the online guide of a guided selector):

- the round sizes are fixed up front and sum to exactly k, so the budget is exact;
- every round buys through ``attacker.oracle.buy``: a 402 or 403 in the middle of a round keeps
  what was bought, ends the rounds and says why (``stopped_by``);
- between rounds the substitute is retrained from scratch on everything bought so far when the
  strategy asks for it (``retrains``); the final substitute trains on all the labels.

A strategy implements ``round_sizes`` (validated before any label is bought), ``choose`` and,
when it learns from the answers, ``observe``.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from attacker.extraction import ExtractionResult, train_on_bought, train_substitute
from attacker.oracle import LabelOracle, buy
from mlcore.datasets import ImageDataset
from mlcore.training import Progress

__all__ = [
    "AdaptiveStrategy",
    "RoundState",
    "RoundsResult",
    "even_rounds",
    "run_rounds",
    "seed_size",
]

logger = logging.getLogger(__name__)

RoundProgress = Callable[[int, int], None]  # (rounds done, rounds planned)


@dataclass
class RoundState:
    """What a strategy sees when it chooses: the pool, what was bought so far, the substitute."""

    pool: ImageDataset
    bought: np.ndarray  # pool indices bought so far, in buying order
    labels: np.ndarray  # the oracle's labels for them
    substitute: nn.Module | None  # retrained on (bought, labels); None before the first round
    rng: np.random.Generator

    def unbought(self) -> np.ndarray:
        """Pool indices not bought yet, ascending."""
        left = np.ones(len(self.pool), dtype=bool)
        left[self.bought] = False
        return np.flatnonzero(left)


class AdaptiveStrategy(ABC):
    """An attack that chooses its queries round by round; see the module docstring."""

    retrains: bool = True  # retrain the substitute between rounds (choose() reads it)

    @property
    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Constructor parameters, JSON-ready, for the report."""

    @abstractmethod
    def round_sizes(self, k: int) -> list[int]:
        """Labels to buy in each round: positive, summing to k; ValueError naming the value when
        the rounds cannot fit k. Called before any label is bought."""

    @abstractmethod
    def choose(self, state: RoundState, size: int) -> np.ndarray:
        """``size`` distinct pool indices not bought yet."""

    def observe(self, state: RoundState, chosen: np.ndarray, labels: np.ndarray) -> None:
        """Learn from a round's answers (``state`` is as it was before the round); by default
        a strategy learns nothing beyond the substitute."""
        return None

    def summary(self) -> dict[str, Any]:
        """What the strategy learnt, JSON-ready, for the report."""
        return {}


@dataclass
class RoundsResult(ExtractionResult):
    rounds: list[dict[str, Any]] = field(default_factory=list)  # one record per round bought
    strategy: dict[str, Any] = field(default_factory=dict)  # AdaptiveStrategy.summary()


def run_rounds(
    strategy: AdaptiveStrategy,
    oracle: LabelOracle,
    pool: ImageDataset,
    *,
    k: int,
    arch: str = "lenet5",
    epochs: int = 30,
    round_epochs: int = 10,
    batch_size: int = 4,
    seed: int = 0,
    semi_supervised: bool = False,
    on_round: RoundProgress | None = None,
    progress: Progress | None = None,
) -> RoundsResult:
    """Buy exactly ``k`` labels from ``oracle`` in ``strategy``'s rounds; train the substitute.

    Intermediate substitutes train ``round_epochs``; the final one ``epochs`` (``progress`` sees
    its epochs; ``semi_supervised`` adds the unlabeled rest of the pool to it). ``on_round`` is
    told after each round.
    """
    if not 1 <= k <= len(pool):
        raise ValueError(f"k must be in 1..{len(pool)} (the pool size), got {k}")
    if round_epochs < 1:
        raise ValueError(f"round_epochs must be >= 1, got {round_epochs}")
    sizes = strategy.round_sizes(k)
    state = RoundState(
        pool, np.empty(0, np.int64), np.empty(0, np.int64), None, np.random.default_rng(seed)
    )
    records: list[dict[str, Any]] = []
    stopped_by: str | None = None
    started = time.perf_counter()
    for number, size in enumerate(sizes, start=1):
        chosen = np.asarray(strategy.choose(state, size), dtype=np.int64)
        _check_choice(chosen, state, size, who=type(strategy).__name__)
        purchase = buy(oracle, pool.images[torch.as_tensor(chosen)].numpy())
        got = purchase.bought
        if got.any():
            strategy.observe(state, chosen[got], purchase.labels[got])
        state.bought = np.concatenate([state.bought, chosen[got]])
        state.labels = np.concatenate([state.labels, purchase.labels[got]])
        records.append({"round": number, "planned": size, "bought": int(got.sum())})
        if on_round is not None:
            on_round(number, len(sizes))
        stopped_by = purchase.stopped_by
        if stopped_by is not None:
            logger.warning("round %d of %d: %s; keeping what was bought", number, len(sizes),
                           purchase.message)  # fmt: skip
            break
        if strategy.retrains and number < len(sizes):
            state.substitute, _, _ = train_substitute(
                pool, state.bought, state.labels, arch=arch, epochs=round_epochs,
                batch_size=batch_size, seed=seed,
            )  # fmt: skip
        logger.info(
            "round %d of %d: %d labels bought in all", number, len(sizes), len(state.bought)
        )
    model, arch_kwargs, _ = train_on_bought(
        pool, state.bought, state.labels, semi_supervised=semi_supervised, arch=arch,
        epochs=epochs, batch_size=batch_size, seed=seed, progress=progress,
    )  # fmt: skip
    return RoundsResult(
        substitute=model,
        arch=arch,
        arch_kwargs=arch_kwargs,
        indices=state.bought,
        labels=state.labels,
        queries_bought=len(state.bought),
        train_seconds=time.perf_counter() - started,
        stopped_by=stopped_by,
        rounds=records,
        strategy=strategy.summary(),
    )


def _check_choice(chosen: np.ndarray, state: RoundState, size: int, *, who: str) -> None:
    """Trust no strategy: ``size`` distinct pool indices, none bought before."""
    if chosen.shape != (size,) or len(np.unique(chosen)) != size:
        raise RuntimeError(f"{who} chose {chosen.shape} indices, expected {size} distinct ones")
    if np.isin(chosen, state.bought).any() or chosen.min() < 0 or chosen.max() >= len(state.pool):
        raise RuntimeError(f"{who} chose an index already bought or outside the pool")


def even_rounds(total: int, rounds: int, *, what: str) -> list[int]:
    """``total`` labels over ``rounds`` rounds, as evenly as possible (earlier rounds the larger);
    ValueError when a round would buy nothing."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if rounds > total:
        raise ValueError(
            f"rounds={rounds} cannot fit the budget: {what} leaves {total} labels, "
            "fewer than one per round"
        )
    each, extra = divmod(total, rounds)
    return [each + (i < extra) for i in range(rounds)]


def seed_size(k: int, seed_fraction: float) -> int:
    """Labels of the random seed round: ``seed_fraction`` of k, at least one when the fraction
    is above 0."""
    if not 0.0 <= seed_fraction < 1.0:
        raise ValueError(f"seed_fraction must be in [0, 1), got {seed_fraction}")
    return 0 if seed_fraction == 0.0 else max(1, round(seed_fraction * k))
