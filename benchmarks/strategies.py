"""Every extraction strategy the range has, found in its registries, run the same way by the
benchmarks (extraction_vs_queries.py, detection.py).

``discover()`` lists them: every selector in ``attacker.selection.SELECTORS`` (DRMI once per
alpha and init asked for), the adaptive strategies and guided selectors that buy in rounds
(``attacker.selection.online``, when that module exists), JbDA, and ART's KnockoffNets (random)
and CopycatCNN through ``attacker.art_interop`` as a peer cross-check. A strategy merged later
appears without touching the benchmarks.

``Strategy.buy(oracle, pool, k=k, seed=seed)`` spends exactly k queries (JbDA: at most k) on
``oracle`` and returns what was bought, in buying order. Pool strategies return pool indices,
which is what a semi-supervised substitute needs (it trains on the rest of the pool too);
JbDA and ART train their own substitute with their own schedule and return it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from attacker.oracle import LabelOracle
from mlcore.datasets import ImageDataset

JBDA_SEED_SIZE = 100  # as `attacker run`
ROUNDS = 10  # adaptive strategies: rounds of buying (the default)
SEED_FRACTION = 0.1  # guided selectors and ActiveThief: share of k bought at random first


@dataclass
class Bought:
    """What a strategy bought: the images queried (uint8, in order) and the labels answered;
    ``indices`` into the pool when the queries were pool images, ``substitute`` when the
    strategy trained its own."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray | None = None
    substitute: torch.nn.Module | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Strategy:
    name: str  # as printed in the tables, e.g. "DRMI min-sum a=2", "cmal", "ART KnockoffNets"
    kind: str  # "selector" | "online" | "jbda" | "art"
    method: str  # the registry name (or ART's class name)
    params: dict[str, Any] = field(default_factory=dict)
    min_k: int = 1

    @property
    def uses_pool_indices(self) -> bool:
        """Whether it buys pool images (so --semi-supervised can use the rest of the pool)."""
        return self.kind in ("selector", "online")

    @property
    def deterministic(self) -> bool:
        """DRMI's selection does not depend on the seed: select once, train once per seed."""
        return self.kind == "selector" and self.method == "drmi"

    def buy(
        self,
        oracle: LabelOracle,
        pool: ImageDataset,
        *,
        k: int,
        seed: int,
        epochs: int = 30,
        mi_cache: dict | None = None,
    ) -> Bought:
        if k < self.min_k:
            raise ValueError(f"k for {self.name} must be at least {self.min_k}, got {k}")
        if self.kind == "selector":
            return _buy_selected(self, oracle, pool, k=k, seed=seed, mi_cache=mi_cache)
        if self.kind == "online":
            return _buy_online(self, oracle, pool, k=k, seed=seed)
        if self.kind == "jbda":
            return _buy_jbda(oracle, pool, k=k, seed=seed)
        return _buy_art(self, oracle, pool, k=k, seed=seed, epochs=epochs)


def discover(
    *,
    alphas: tuple[float, ...] = (2.0,),
    inits: tuple[str, ...] = ("min-sum",),
    art: bool = True,
) -> list[Strategy]:
    """Every registered strategy; ``art`` adds ART's two attacks when ART is installed."""
    from attacker.selection import SELECTORS

    online = _online_module()
    strategies: list[Strategy] = []
    for method, selector_class in SELECTORS.items():
        if method == "drmi":
            strategies += [
                Strategy(f"DRMI {init} a={alpha:g}", "selector", "drmi", {"alpha": alpha, "init": init})
                for init in inits
                for alpha in alphas
            ]  # fmt: skip
        elif getattr(selector_class, "guide", None) is None:
            strategies.append(Strategy(method, "selector", method))
        elif online is not None:  # a guided selector: its guide comes from a bought seed round
            strategies.append(Strategy(method, "online", method))
    if online is not None:
        strategies += [Strategy(method, "online", method) for method in online.ADAPTIVE_METHODS]
    strategies.append(Strategy("jbda", "jbda", "jbda", min_k=JBDA_SEED_SIZE))
    if art and _art_installed():
        strategies += [
            Strategy("ART KnockoffNets (random)", "art", "KnockoffNets"),
            Strategy("ART CopycatCNN", "art", "CopycatCNN"),
        ]
    return strategies


def _online_module():
    """``attacker.selection.online`` (adaptive strategies, guided selectors online) or None."""
    try:
        from attacker.selection import online
    except ImportError:
        return None
    return online


def _art_installed() -> bool:
    try:
        import art  # noqa: F401
    except ImportError:
        return False
    return True


def selector_params(strategy: Strategy, seed: int) -> dict[str, Any]:
    """Its fixed parameters, plus ``seed`` when it is a selector that takes one (adaptive
    strategies get their seed from ``build_online``)."""
    from attacker.selection import SELECTORS

    if strategy.method not in SELECTORS:
        return dict(strategy.params)
    accepted = inspect.signature(SELECTORS[strategy.method]).parameters
    return {**strategy.params, **({"seed": seed} if "seed" in accepted else {})}


def _buy_selected(
    strategy: Strategy,
    oracle: LabelOracle,
    pool: ImageDataset,
    *,
    k: int,
    seed: int,
    mi_cache: dict | None,
) -> Bought:
    from attacker.extraction import buy_labels
    from attacker.selection import make_selector

    params = selector_params(strategy, seed)
    if strategy.method == "drmi" and mi_cache is not None:
        params["mi_cache"] = mi_cache  # one MI matrix per class for every alpha, init and k
    chosen = make_selector(strategy.method, **params)(
        pool.images.numpy(), pool.labels.numpy(), k=k
    ).indices
    indices, labels, _ = buy_labels(oracle, pool, chosen)
    return Bought(pool.images[torch.as_tensor(indices)].numpy(), labels, indices)


def _buy_online(
    strategy: Strategy, oracle: LabelOracle, pool: ImageDataset, *, k: int, seed: int
) -> Bought:
    """Through ``run_rounds``; its final substitute is discarded (one epoch), the benchmark
    trains every strategy's final substitute with the same recipe."""
    from attacker.selection.rounds import run_rounds

    online = _online_module()
    assert online is not None  # discover() lists online strategies only when it exists
    method = online.build_online(
        strategy.method, k=k, selector_params=selector_params(strategy, seed), rounds=ROUNDS,
        seed_fraction=SEED_FRACTION, seed=seed, target_probabilities=False,
    )  # fmt: skip
    result = run_rounds(method.strategy, oracle, pool, k=k, epochs=1, seed=seed)
    indices = np.asarray(result.indices)
    return Bought(
        pool.images[torch.as_tensor(indices)].numpy(),
        np.asarray(result.labels),
        indices,
        details={"rounds": len(result.rounds), "guide_source": method.guide_source},
    )


def _buy_jbda(oracle: LabelOracle, pool: ImageDataset, *, k: int, seed: int) -> Bought:
    from attacker.jbda import jbda_extract

    recorder = _Recorder(oracle)
    result = jbda_extract(recorder, pool, k=k, seed_size=JBDA_SEED_SIZE, seed=seed)
    return Bought(*recorder.stream(), substitute=result.substitute)


def _buy_art(
    strategy: Strategy, oracle: LabelOracle, pool: ImageDataset, *, k: int, seed: int, epochs: int
) -> Bought:
    """ART's attack with our LeNet-5 as the thief, trained as ours are (Adam 1e-3, batch 4)."""
    from art.attacks.extraction import CopycatCNN, KnockoffNets

    from attacker.art_interop import art_substitute, art_victim

    recorder = _Recorder(oracle)
    victim = art_victim(recorder, input_shape=pool.input_shape, nb_classes=pool.num_classes)
    options = {"batch_size_fit": 4, "batch_size_query": 100, "nb_epochs": epochs, "nb_stolen": k}
    if strategy.method == "KnockoffNets":
        attack = KnockoffNets(victim, sampling_strategy="random", **options)
    else:
        attack = CopycatCNN(victim, **options)
    np.random.seed(seed)  # ART draws its queries from numpy's global generator
    thief = attack.extract(
        pool.as_float().numpy(),
        thieved_classifier=art_substitute(
            input_shape=pool.input_shape, nb_classes=pool.num_classes, seed=seed
        ),
    )
    return Bought(*recorder.stream(), substitute=thief.model.eval())


class _Recorder:
    """Passes queries to an oracle and keeps them, in order: the attacker's query stream."""

    def __init__(self, oracle: LabelOracle) -> None:
        self.oracle = oracle
        self.meter = oracle.meter
        self.queries_remaining = oracle.queries_remaining
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        labels = self.oracle.predict_labels(images)
        self.images.append(np.asarray(images))
        self.labels.append(np.asarray(labels))
        return labels

    def stream(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.images), np.concatenate(self.labels)
