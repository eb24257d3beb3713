"""Transfer attacks: craft adversarial examples on the substitute, send the ones that fool it to
the target, and measure how many fool the target too (DRMI paper, Section 5.3).

The procedure, as the paper runs it:

1. Seeds: ``n`` images of the test set that the *substitute* classifies correctly, chosen at
   random (seeded). The attacker never pays to check what the target says about them.
2. Crafting: an attack of ``mlcore.adversarial`` (PGD; IGSM; C&W L2) on the substitute.
   Targeted: one example per other class for each seed (9 on MNIST); untargeted: one per seed. The wire carries 8-bit images, so each example is
   quantised to uint8 by rounding its perturbation towards zero (it can only shrink, so the
   example stays inside the eps-ball) and judged on the substitute *after* quantisation.
3. Only the examples that fool the substitute are sent to the target; each costs one query.
   Success on the target: it says the target class (targeted) or anything but the seed's true
   label (untargeted). ``transferability`` = successes / examples sent: a *conditional* rate
   (seeds the substitute gets right, examples that fool it). A target with an input defence may
   refuse an example (``REJECTED``: charged, no label): it counts as sent and not successful, and
   ``rejected`` counts them; ``transferability_answered`` is the rate among the answered ones.

``send_all=True`` is the paper's own protocol (Section 5.3: examples crafted from N random test
images, success counted over all of them): seeds are random test images, *every* crafted
example is sent, and ``transferability_all`` = successes / all examples sent. The conditional
``transferability`` is then measured on the subset of the same examples that meets its
conditions, so both figures come from one set of queries.
4. Noise baseline (optional, each probe also costs one query and is counted apart as
   ``noise_queries``): for every example sent, the same seed plus random noise of the same size
   (same L-inf or L2 norm as that example's perturbation, random signs / direction, clipped to
   [0, 1]), judged by the same rule. It is sent after all the examples, so a budget that runs
   out costs the baseline, not the attack.

A 402 (budget) or 403 (blocked) stops the step cleanly (``attacker.oracle.buy``: what is left
of the budget is spent first): the result covers what was sent, ``stopped_by`` says why. Other
oracle errors propagate; the HTTP oracle's answer cache means a re-run does not pay again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from attacker.oracle import NOT_BOUGHT, REJECTED, LabelOracle, Purchase, buy
from mlcore.adversarial import Attack
from mlcore.datasets import ImageDataset
from mlcore.training import predict_labels

__all__ = [
    "Crafted",
    "TransferProgress",
    "TransferResult",
    "choose_seeds",
    "craft",
    "noise_like",
    "perturbation_norms",
    "quantize",
    "random_seeds",
    "transfer_attack",
]

logger = logging.getLogger(__name__)

TransferProgress = Callable[[str, int, int], None]  # (stage, done, total)
STAGES = ("crafting", "querying target", "noise baseline")


def choose_seeds(
    substitute: nn.Module, dataset: ImageDataset, n: int, *, seed: int = 0
) -> np.ndarray:
    """Indices (ascending) of ``n`` images of ``dataset`` that ``substitute`` classifies
    correctly, drawn at random with ``seed``; fewer (with a warning) if fewer qualify."""
    _check_seed_count(n)
    predicted = predict_labels(substitute, dataset.images).numpy()
    correct = np.flatnonzero(predicted == dataset.labels.numpy())
    if len(correct) == 0:
        raise ValueError(f"the substitute classifies no image of {dataset.name} correctly")
    if len(correct) < n:
        logger.warning(
            "only %d images of %s are classified correctly by the substitute; using all of them",
            len(correct),
            dataset.name,
        )
        return correct
    return np.sort(np.random.default_rng(seed).choice(correct, size=int(n), replace=False))


def random_seeds(dataset: ImageDataset, n: int, *, seed: int = 0) -> np.ndarray:
    """Indices (ascending) of ``n`` images of ``dataset`` drawn at random with ``seed``, whatever
    any model says about them (the paper's seeds); all of them if it has fewer."""
    _check_seed_count(n)
    count = min(int(n), len(dataset))
    return np.sort(np.random.default_rng(seed).choice(len(dataset), size=count, replace=False))


def _check_seed_count(n: object) -> None:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"number of seeds must be an integer >= 1, got {n!r}")


def quantize(x: np.ndarray, adversarial: torch.Tensor) -> np.ndarray:
    """uint8 version of float ``adversarial`` around the uint8 seeds ``x``: the perturbation is
    rounded towards zero, so each of its coordinates (hence any norm of it) can only shrink."""
    delta = adversarial.detach().double().numpy() * 255.0 - x.astype(np.float64)
    return (x.astype(np.int16) + np.trunc(delta).astype(np.int16)).clip(0, 255).astype(np.uint8)


def perturbation_norms(x: np.ndarray, adversarial: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L-inf, L2) norms per example of ``adversarial - x``, both uint8, in [0, 1] pixel units."""
    if len(x) == 0:
        return np.zeros(0), np.zeros(0)
    delta = (adversarial.astype(np.float64) - x.astype(np.float64)).reshape(len(x), -1) / 255.0
    return np.abs(delta).max(axis=1), np.linalg.norm(delta, axis=1)


def noise_like(
    x: np.ndarray, adversarial: np.ndarray, *, norm: str, rng: np.random.Generator
) -> np.ndarray:
    """Random noise of the same size as each perturbation ``adversarial - x`` (uint8 images).

    L-inf: every pixel moved by that example's max |delta| with a random sign; L2: a random
    Gaussian direction scaled to that example's L2 norm, rounded towards ``x`` (so, like the
    examples, it never grows on the wire). Then clipped to [0, 1] (0..255), like the examples.
    Worked in 8-bit units, so the L-inf size is matched exactly.
    """
    delta = adversarial.astype(np.int64) - x.astype(np.int64)
    flat = delta.reshape(len(x), -1)
    shape = (len(x),) + (1,) * (x.ndim - 1)
    if norm == "linf":
        size = np.abs(flat).max(axis=1, initial=0).reshape(shape)
        noise = rng.choice(np.array([-1, 1]), size=x.shape) * size
    elif norm == "l2":
        size = np.linalg.norm(flat.astype(np.float64), axis=1)
        direction = rng.standard_normal(size=x.shape)
        scale = np.linalg.norm(direction.reshape(len(x), -1), axis=1).clip(min=1e-12)
        noise = np.trunc(direction * (size / scale).reshape(shape)).astype(np.int64)
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    return (x.astype(np.int64) + noise).clip(0, 255).astype(np.uint8)


@dataclass
class Crafted:
    """Adversarial examples crafted on the substitute, one row per (seed, target) task."""

    seed_row: np.ndarray  # index into the seed images
    source: np.ndarray  # the seed's true label
    target: np.ndarray  # wanted class (targeted), -1 (untargeted)
    adversarial: np.ndarray  # uint8, as sent on the wire
    substitute_label: np.ndarray  # substitute's label of the quantised example
    fooled_substitute: np.ndarray  # bool
    seconds: float


def _tasks(labels: np.ndarray, num_classes: int, targeted: bool) -> tuple[np.ndarray, np.ndarray]:
    """(seed row, target class) per task: every other class for targeted, -1 for untargeted."""
    rows = np.arange(len(labels))
    if not targeted:
        return rows, np.full(len(labels), -1, dtype=np.int64)
    pairs = [(row, cls) for row in rows for cls in range(num_classes) if cls != labels[row]]
    seed_row, target = np.array(pairs, dtype=np.int64).reshape(-1, 2).T
    return seed_row, target


def craft(
    attack: Attack,
    substitute: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    targeted: bool,
    num_classes: int,
    batch_size: int = 256,
    progress: TransferProgress | None = None,
) -> Crafted:
    """Run ``attack`` on ``substitute`` for every task built from the uint8 seed ``images``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    labels = np.asarray(labels, dtype=np.int64)
    seed_row, target = _tasks(labels, num_classes, targeted)
    source = labels[seed_row]
    adversarial = np.empty((len(seed_row), *images.shape[1:]), dtype=np.uint8)
    started = time.perf_counter()
    for start in range(0, len(seed_row), batch_size):
        rows = slice(start, start + batch_size)
        x_uint8 = images[seed_row[rows]]
        x = torch.from_numpy(x_uint8).float().div(255.0)
        if targeted:
            out = attack(substitute, x, target=torch.from_numpy(target[rows]))
        else:
            out = attack(substitute, x, labels=torch.from_numpy(source[rows]))
        adversarial[rows] = quantize(x_uint8, out)
        if progress is not None:
            progress("crafting", min(start + batch_size, len(seed_row)), len(seed_row))
    seconds = time.perf_counter() - started
    predicted = predict_labels(substitute, torch.from_numpy(adversarial)).numpy()
    fooled = predicted == target if targeted else predicted != source
    return Crafted(seed_row, source, target, adversarial, predicted, fooled, seconds)


def _send(
    oracle: LabelOracle,
    images: np.ndarray,
    *,
    chunk: int,
    stage: str,
    progress: TransferProgress | None,
) -> Purchase:
    """Buy labels chunk by chunk (so progress shows); stop at the first chunk a 402 or 403
    stopped (``buy`` has then spent what was left of the budget)."""
    labels = np.full(len(images), NOT_BOUGHT, dtype=np.int64)
    for start in range(0, len(images), chunk):
        stop = min(start + chunk, len(images))
        purchase = buy(oracle, images[start:stop])
        labels[start:stop] = purchase.labels
        if progress is not None:
            progress(stage, stop, len(images))
        if purchase.stopped_by is not None:
            return Purchase(labels, purchase.stopped_by, purchase.message)
    return Purchase(labels)


@dataclass
class TransferResult:
    """Everything one transfer step measured; ``summary()`` is the JSON of ``transfer.json``."""

    attack: Attack
    targeted: bool
    seed_set: str
    seed: int  # of the seed draw
    seed_indices: np.ndarray  # into the seed set
    seed_images: np.ndarray  # uint8, one per seed
    num_classes: int
    crafted: Crafted
    seed_correct: np.ndarray  # bool per seed: the substitute classifies it correctly
    sent_index: np.ndarray  # rows of ``crafted`` sent (those that fooled it, or all: send_all)
    target_labels: np.ndarray  # the target's label per sent row; NOT_BOUGHT / REJECTED
    success: np.ndarray  # bool per sent row
    send_all: bool = False
    noise_labels: np.ndarray | None = None  # per sent row; NOT_BOUGHT / REJECTED
    noise_success: np.ndarray | None = None
    noise_images: np.ndarray | None = None
    stopped_by: str | None = None  # "budget" | "blocked"
    stop_message: str | None = None
    # queries_paid / queries_replayed / queries_from_cache of this step (Meter.report)
    queries: dict[str, int] = field(default_factory=dict)

    @property
    def received(self) -> np.ndarray:
        """Per sent row: the target got it and charged it (answered or refused)."""
        return self.target_labels != NOT_BOUGHT

    @property
    def answered(self) -> np.ndarray:
        """Per sent row: the target answered with a label."""
        return self.target_labels >= 0

    @property
    def rejected(self) -> np.ndarray:
        """Per sent row: the target's input defence refused it."""
        return self.target_labels == REJECTED

    @property
    def sent(self) -> int:
        return int(self.received.sum())

    @property
    def conditional(self) -> np.ndarray:
        """Per sent row: counts for our conditional ``transferability`` (the seed is classified
        correctly by the substitute and the example fools it)."""
        rows = self.sent_index
        return self.crafted.fooled_substitute[rows] & self.seed_correct[self.crafted.seed_row[rows]]

    @property
    def noise_sent(self) -> int:
        return 0 if self.noise_labels is None else int((self.noise_labels != NOT_BOUGHT).sum())

    def summary(self) -> dict[str, Any]:
        crafted, received = self.crafted, self.received
        rows = self.sent_index[received]
        won = self.success[received]
        sent_images = crafted.adversarial[rows]
        seeds = self.seed_images
        linf, l2 = perturbation_norms(seeds[crafted.seed_row[rows]], sent_images)
        all_linf, all_l2 = perturbation_norms(seeds[crafted.seed_row], crafted.adversarial)
        fooled_target = int(won.sum())
        answered, rejected = int(self.answered.sum()), int(self.rejected.sum())
        ours = self.conditional & received
        ours_won = int((self.success & ours).sum())
        if self.send_all:
            seed_rule = f"random test images (the paper's protocol), drawn with seed {self.seed}"
        else:
            seed_rule = (
                f"images the substitute classifies correctly, drawn at random with seed {self.seed}"
            )
        summary: dict[str, Any] = {
            "targeted": self.targeted,
            "attack": self.attack.name,
            "attack_description": self.attack.describe(),
            "norm": self.attack.norm,
            **{k: v for k, v in self.attack.params.items() if k != "seed"},
            "attack_seed": self.attack.seed,
            "seed": self.seed,
            "seed_set": self.seed_set,
            "seed_rule": seed_rule,
            "send": "all" if self.send_all else "fooling_substitute",
            "seeds": len(self.seed_indices),
            "seed_indices": self.seed_indices.tolist(),
            "crafted": len(crafted.seed_row),
            "fooled_substitute": int(crafted.fooled_substitute.sum()),
            "substitute_success": _rate(
                int(crafted.fooled_substitute.sum()), len(crafted.seed_row)
            ),
            "sent": self.sent,
            "answered": answered,
            "rejected": rejected,
            "rejected_share": _rate(rejected, self.sent),
            "fooled_target": fooled_target,
            "transferability_answered": _rate(fooled_target, answered),
            "transferability": _rate(ours_won, int(ours.sum())),
            "conditional_sent": int(ours.sum()),
            "conditional_fooled_target": ours_won,
            "transferability_all": _rate(fooled_target, self.sent) if self.send_all else None,
            "end_to_end_success": _rate(fooled_target, len(crafted.seed_row)),
            "noise_baseline": None,
            "noise_sent": self.noise_sent,
            "noise_fooled": None,
            "noise_queries": self.noise_sent,
            "queries_asked": self.sent + self.noise_sent,
            **self.queries,
            "stopped_by": self.stopped_by,
            "stop_message": self.stop_message,
            "mean_linf": _mean(linf),
            "mean_l2": _mean(l2),
            "mean_linf_crafted": _mean(all_linf),
            "mean_l2_crafted": _mean(all_l2),
            "craft_seconds": round(crafted.seconds, 3),
            "seconds_per_example": round(crafted.seconds / max(len(crafted.seed_row), 1), 5),
            "curve": _curve(won),
        }
        if self.noise_labels is not None and self.noise_success is not None:
            probed = self.noise_labels != NOT_BOUGHT
            noise_fooled = int(self.noise_success[probed].sum())
            noise_linf, noise_l2 = (
                perturbation_norms(
                    seeds[crafted.seed_row[self.sent_index[probed]]],
                    self.noise_images[probed],
                )
                if self.noise_images is not None
                else (np.zeros(0), np.zeros(0))
            )
            summary.update(
                noise_baseline=_rate(noise_fooled, self.noise_sent),
                noise_fooled=noise_fooled,
                noise_rejected=int((self.noise_labels == REJECTED).sum()),
                noise_mean_linf=_mean(noise_linf),
                noise_mean_l2=_mean(noise_l2),
            )
            noise_curve = _curve(self.noise_success[probed])
            summary["curve"]["noise_queries"] = noise_curve["queries"]
            summary["curve"]["noise_fooled"] = noise_curve["fooled"]
        summary.update(self._per_class(rows, won))
        return summary

    def _per_class(self, rows: np.ndarray, won: np.ndarray) -> dict[str, Any]:
        """Per seed class success, and the two matrices of the paper's Figures 4-5 (whose
        counts cover the examples answered: a refused one has no label)."""
        c = self.num_classes
        source, target = self.crafted.source[rows], self.crafted.target[rows]
        labels = self.target_labels[self.received]
        counts = np.zeros((c, c), dtype=np.int64)  # seed class x target's label (paper style)
        has_label = labels >= 0
        np.add.at(counts, (source[has_label], labels[has_label]), 1)
        per_class_sent = np.bincount(source, minlength=c)
        per_class_won = np.bincount(source, weights=won.astype(float), minlength=c)
        out: dict[str, Any] = {
            "per_class": {
                "sent": per_class_sent.tolist(),
                "fooled_target": per_class_won.astype(int).tolist(),
                "success": [
                    _rate(int(w), int(n))
                    for w, n in zip(per_class_won, per_class_sent, strict=True)
                ],
            },
            "confusion_counts": counts.tolist(),
        }
        if self.targeted:
            pair_sent = np.zeros((c, c), dtype=np.int64)
            pair_won = np.zeros((c, c), dtype=np.int64)
            np.add.at(pair_sent, (source, target), 1)
            np.add.at(pair_won, (source, target), won.astype(np.int64))
            out["confusion_success"] = [
                [_rate(int(pair_won[i, j]), int(pair_sent[i, j])) for j in range(c)]
                for i in range(c)
            ]
        return out


def _curve(won: np.ndarray, *, points: int = 200) -> dict[str, list[int]]:
    """Successes so far against queries spent, in the order the images were sent (at most
    ``points`` points, always including the last)."""
    if len(won) == 0:
        return {"queries": [], "fooled": []}
    total = np.cumsum(won.astype(np.int64))
    at = np.unique(np.linspace(1, len(won), num=min(points, len(won))).round().astype(np.int64))
    return {"queries": at.tolist(), "fooled": total[at - 1].tolist()}


def _rate(wins: int, total: int) -> float | None:
    return None if total == 0 else wins / total


def _mean(values: np.ndarray) -> float | None:
    return None if len(values) == 0 else float(np.mean(values))


def transfer_attack(
    oracle: LabelOracle,
    substitute: nn.Module,
    dataset: ImageDataset,
    *,
    attack: Attack,
    targeted: bool,
    seeds: int,
    seed: int = 0,
    noise_baseline: bool = True,
    send_all: bool = False,
    craft_batch: int = 256,
    query_batch: int = 100,
    progress: TransferProgress | None = None,
) -> TransferResult:
    """The whole transfer step (see the module docstring) against ``oracle``; ``send_all``
    follows the paper's protocol (random seeds, every crafted example sent)."""
    if not isinstance(attack, Attack):
        raise ValueError(
            f"attack must be an mlcore.adversarial Attack, got {type(attack).__name__}"
        )
    attack.check_mode(targeted)
    if query_batch < 1:
        raise ValueError(f"query_batch must be >= 1, got {query_batch}")
    substitute.eval()
    if send_all:
        seed_indices = random_seeds(dataset, seeds, seed=seed)
    else:
        seed_indices = choose_seeds(substitute, dataset, seeds, seed=seed)
    images = dataset.images[torch.as_tensor(seed_indices)].numpy()
    labels = dataset.labels[torch.as_tensor(seed_indices)].numpy()
    seed_correct = predict_labels(substitute, torch.from_numpy(images)).numpy() == labels
    crafted = craft(
        attack,
        substitute,
        images,
        labels,
        targeted=targeted,
        num_classes=dataset.num_classes,
        batch_size=craft_batch,
        progress=progress,
    )
    if send_all:
        sent_index = np.arange(len(crafted.seed_row))
    else:
        sent_index = np.flatnonzero(crafted.fooled_substitute)  # only these are sent
    wanted = crafted.target[sent_index] if targeted else crafted.source[sent_index]

    def hit(answer: np.ndarray) -> np.ndarray:
        """Success per sent row: the wanted class (targeted) or not the seed's (untargeted);
        never an image left unanswered or refused."""
        answered = answer >= 0
        won = answer == wanted if targeted else answer != wanted
        return won & answered

    meter_before = oracle.meter.snapshot()
    sent = _send(
        oracle,
        crafted.adversarial[sent_index],
        chunk=query_batch,
        stage=STAGES[1],
        progress=progress,
    )
    result = TransferResult(
        attack=attack,
        targeted=targeted,
        seed_set=dataset.name,
        seed=seed,
        seed_indices=seed_indices,
        seed_images=images,
        num_classes=dataset.num_classes,
        crafted=crafted,
        seed_correct=seed_correct,
        sent_index=sent_index,
        target_labels=sent.labels,
        success=hit(sent.labels),
        send_all=send_all,
        stopped_by=sent.stopped_by,
        stop_message=sent.message,
    )
    received = np.flatnonzero(sent.labels != NOT_BOUGHT)
    if noise_baseline and sent.stopped_by is None and len(received):
        noisy = np.zeros_like(crafted.adversarial[sent_index])
        noisy[received] = noise_like(
            images[crafted.seed_row[sent_index[received]]],
            crafted.adversarial[sent_index[received]],
            norm=attack.norm,
            rng=np.random.default_rng(seed),
        )
        probes = _send(
            oracle, noisy[received], chunk=query_batch, stage=STAGES[2], progress=progress
        )
        noise_labels = np.full(len(sent_index), NOT_BOUGHT, dtype=np.int64)
        noise_labels[received] = probes.labels
        result.noise_labels, result.noise_success = noise_labels, hit(noise_labels)
        result.noise_images = noisy
        result.stopped_by, result.stop_message = probes.stopped_by, probes.message
    result.queries = oracle.meter.report(since=meter_before)
    return result
