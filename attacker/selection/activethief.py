"""ActiveThief (Pal et al., AAAI 2020): active-learning rounds over the attacker's pool.

A random seed round (``seed_fraction`` of k) trains a first substitute; each later round scores
the pool images not bought yet by the substitute's output and buys the best ``size`` of them,
and the substitute is retrained from scratch on everything bought:
- ``entropy`` (uncertainty): the images whose predicted distribution has the largest entropy;
- ``kcenter`` (core-set, Sener & Savarese): greedy k-center in the substitute's probability
  space, each pick the image farthest from everything bought or picked so far.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from scipy.stats import entropy

from attacker.selection.guides import probabilities_from_model
from attacker.selection.rounds import AdaptiveStrategy, RoundState, even_rounds, seed_size

__all__ = ["CRITERIA", "ActiveThief", "k_center_greedy"]

Criterion = Literal["entropy", "kcenter"]
CRITERIA: tuple[str, ...] = ("entropy", "kcenter")


class ActiveThief(AdaptiveStrategy):
    """ActiveThief's ``criterion`` rounds after a random seed round; see the module docstring."""

    def __init__(
        self,
        *,
        criterion: Criterion,
        rounds: int = 10,
        seed_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
        seed_size(1, seed_fraction)  # validates the fraction
        if seed_fraction == 0.0:
            raise ValueError(
                "seed_fraction must be > 0: ActiveThief scores the pool with a substitute "
                "trained on a random seed round, got 0"
            )
        self.criterion: Criterion = criterion
        self.rounds, self.seed_fraction, self.seed = rounds, float(seed_fraction), int(seed)

    @property
    def params(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion,
            "rounds": self.rounds,
            "seed_fraction": self.seed_fraction,
            "seed": self.seed,
        }

    def round_sizes(self, k: int) -> list[int]:
        seed = seed_size(k, self.seed_fraction)
        if seed >= k:
            raise ValueError(
                f"k={k} cannot fit a seed round of {seed} and {self.rounds} active round(s)"
            )
        return [seed, *even_rounds(k - seed, self.rounds, what=f"k={k} after a seed of {seed}")]

    def choose(self, state: RoundState, size: int) -> np.ndarray:
        left = state.unbought()
        if state.substitute is None:  # the seed round
            return state.rng.choice(left, size=size, replace=False)
        images = state.pool.images
        outputs = probabilities_from_model(state.substitute, images[torch.as_tensor(left)])
        if self.criterion == "entropy":
            order = np.argsort(-entropy(outputs, axis=1), kind="stable")  # ties: lowest index
            return left[order[:size]]
        centres = probabilities_from_model(state.substitute, images[torch.as_tensor(state.bought)])
        return left[k_center_greedy(outputs, centres, size)]


def k_center_greedy(points: np.ndarray, centres: np.ndarray, size: int) -> np.ndarray:
    """Indices of ``size`` rows of ``points`` chosen greedily, each the farthest (Euclidean)
    from ``centres`` and the rows already chosen."""
    if not 1 <= size <= len(points):
        raise ValueError(f"size must be in 1..{len(points)}, got {size}")
    x = torch.as_tensor(points, dtype=torch.float64)
    nearest = (
        torch.cdist(x, torch.as_tensor(centres, dtype=torch.float64)).min(dim=1).values
        if len(centres)
        else torch.full((len(x),), torch.inf, dtype=torch.float64)
    )
    chosen = np.empty(size, dtype=np.int64)
    for i in range(size):
        pick = int(nearest.argmax())
        chosen[i] = pick
        nearest = torch.minimum(nearest, torch.cdist(x, x[pick : pick + 1]).squeeze(1))
        nearest[pick] = -1.0  # never picked twice
    return chosen
