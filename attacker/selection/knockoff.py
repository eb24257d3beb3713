"""Knockoff Nets (Orekondy et al., CVPR 2019): random and adaptive transfer-set sampling.

``knockoff-random`` draws uniformly from the whole pool, blind to its classes (unlike the range's
``random`` baseline, which keeps the pool's class balance): it needs no oracle, so it is a plain
``Selector``.

``knockoff-adaptive`` is the paper's gradient-bandit policy over the pool's classes (the
actions): each image to buy is drawn from a class sampled from pi = softmax(H); once a round's
labels are bought, each answer's reward moves the preferences,

    H <- H + lr * (r - r_bar) * (onehot(class) - pi)        (Sutton & Barto, Sec. 2.8)

with r_bar the mean reward so far. The rewards are the paper's, on the victim's output y (a
one-hot vector from a label-only target):
- certainty: the margin between y's two largest entries (constant 1 for one-hot answers, so it
  carries no signal against a label-only target; kept for completeness);
- diversity: sum_k max(0, y_k - y_bar_k), y_bar the mean of the answers bought before the round;
- loss: cross-entropy between y and the substitute's output (the substitute is retrained on
  everything bought after each round).
Each reward is standardised by its own running mean and deviation before they are summed, as the
paper's rewards live on different scales.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from attacker.selection.base import SelectionResult, Selector
from attacker.selection.guides import probabilities_from_model
from attacker.selection.rounds import AdaptiveStrategy, RoundState, even_rounds

__all__ = ["REWARDS", "GradientBandit", "KnockoffAdaptive", "KnockoffRandomSelector"]

Reward = Literal["certainty", "diversity", "loss", "all"]
REWARDS: tuple[str, ...] = ("certainty", "diversity", "loss", "all")


class KnockoffRandomSelector(Selector):
    """Uniform sample of the pool without replacement, blind to its labels."""

    def __init__(self, *, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = int(seed)

    @property
    def params(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def run(
        self, images: np.ndarray, labels: np.ndarray, *, k: int, guide: np.ndarray | None
    ) -> SelectionResult:
        chosen = np.random.default_rng(self.seed).choice(len(images), size=k, replace=False)
        classes, counts = np.unique(labels[chosen], return_counts=True)
        pool_counts = dict(zip(*np.unique(labels, return_counts=True), strict=True))
        per_class = {
            int(c): {"k": int(n), "n": int(pool_counts[c])}
            for c, n in zip(classes, counts, strict=True)
        }
        return SelectionResult(indices=np.sort(chosen), per_class=per_class)


class GradientBandit:
    """A gradient bandit over ``actions`` arms: preferences H, policy softmax(H)."""

    def __init__(self, actions: int, *, lr: float, rng: np.random.Generator) -> None:
        if actions < 1:
            raise ValueError(f"actions must be >= 1, got {actions}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.lr, self.rng = float(lr), rng
        self.preferences = np.zeros(actions)
        self.baseline, self.updates = 0.0, 0

    def policy(self, available: np.ndarray | None = None) -> np.ndarray:
        """pi = softmax(H) over the ``available`` actions (a boolean mask; all by default)."""
        logits = self.preferences.copy()
        if available is not None:
            logits[~available] = -np.inf
        logits -= logits.max()
        weights = np.exp(logits)
        return weights / weights.sum()

    def sample(self, available: np.ndarray | None = None) -> int:
        return int(self.rng.choice(len(self.preferences), p=self.policy(available)))

    def update(self, action: int, reward: float) -> None:
        """One gradient-bandit step; the baseline is the mean of the rewards before this one."""
        pi = self.policy()
        step = self.lr * (reward - self.baseline)
        self.preferences -= step * pi
        self.preferences[action] += step
        self.updates += 1
        self.baseline += (reward - self.baseline) / self.updates


class _RunningScale:
    """Standardises a stream of values by their running mean and deviation (Welford)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def __call__(self, value: float) -> float:
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)
        std = (self.m2 / self.count) ** 0.5
        return 0.0 if std < 1e-12 else (value - self.mean) / std


class KnockoffAdaptive(AdaptiveStrategy):
    """Knockoff Nets' adaptive strategy, ``rounds`` purchases; see the module docstring."""

    def __init__(
        self, *, rounds: int = 10, reward: Reward = "all", lr: float = 0.1, seed: int = 0
    ) -> None:
        if reward not in REWARDS:
            raise ValueError(f"reward must be one of {', '.join(REWARDS)}, got {reward!r}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.rounds, self.reward, self.lr, self.seed = rounds, reward, float(lr), int(seed)
        self.kinds = ("certainty", "diversity", "loss") if reward == "all" else (reward,)
        self.retrains = "loss" in self.kinds  # only the loss reward reads the substitute
        self.bandit: GradientBandit | None = None
        self._scales = {kind: _RunningScale() for kind in self.kinds}
        self._action_of: dict[int, int] = {}  # pool index -> the class it was drawn for
        self._policy_by_round: list[list[float]] = []

    @property
    def params(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "reward": self.reward, "lr": self.lr, "seed": self.seed}

    def round_sizes(self, k: int) -> list[int]:
        return even_rounds(k, self.rounds, what=f"k={k}")

    def choose(self, state: RoundState, size: int) -> np.ndarray:
        classes = state.pool.num_classes
        if self.bandit is None:
            self.bandit = GradientBandit(classes, lr=self.lr, rng=np.random.default_rng(self.seed))
        labels = state.pool.labels.numpy()
        left = state.unbought()
        members = [list(state.rng.permutation(left[labels[left] == c])) for c in range(classes)]
        chosen = np.empty(size, dtype=np.int64)
        for i in range(size):
            action = self.bandit.sample(np.array([len(m) > 0 for m in members]))
            chosen[i] = members[action].pop()
            self._action_of[int(chosen[i])] = action
        return chosen

    def observe(self, state: RoundState, chosen: np.ndarray, labels: np.ndarray) -> None:
        assert self.bandit is not None  # choose() always runs first
        classes = state.pool.num_classes
        answers = np.eye(classes)[labels]  # the victim's output, one-hot
        rewards = {"certainty": _margin(answers)}
        previous = np.eye(classes)[state.labels].mean(axis=0) if len(state.labels) else None
        rewards["diversity"] = (
            np.zeros(len(chosen))
            if previous is None
            else np.clip(answers - previous, 0.0, None).sum(axis=1)
        )
        if "loss" in self.kinds:
            substitute = (
                np.full((len(chosen), classes), 1.0 / classes)
                if state.substitute is None
                else probabilities_from_model(
                    state.substitute, state.pool.images[torch.as_tensor(chosen)]
                )
            )
            rewards["loss"] = -np.log(np.clip(substitute[np.arange(len(chosen)), labels], 1e-12, 1))
        for i, index in enumerate(chosen):
            total = sum(self._scales[kind](float(rewards[kind][i])) for kind in self.kinds)
            self.bandit.update(self._action_of.pop(int(index)), total)
        self._policy_by_round.append([round(p, 4) for p in self.bandit.policy().tolist()])

    def summary(self) -> dict[str, Any]:
        return {"class_policy_by_round": self._policy_by_round}


def _margin(outputs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 of each row."""
    top = np.sort(outputs, axis=1)
    return top[:, -1] - top[:, -2]
