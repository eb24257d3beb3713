"""The adaptive attacker against the KL detector of "Less is More" (seed 001; the paper's own
future work): it knows the defence, so it builds the defence's pair on its own side.

1. Twin: self-sanitisation of its substitute with the labels it bought: keep the bought images
   whose confidence on their bought label, under the substitute, is at or above ``threshold``
   (``mlcore.divergences.confident_indices``, float64 log space), and train a fresh model of the
   substitute's architecture on them alone: a sanitised twin, as the defender builds its
   sanitised model from the target.
2. Crafting: ``TwinEvasivePGD``, PGD on the substitute minus ``kl_weight`` times
   KL(substitute || twin), so each example reaches the wanted class on the substitute while its
   two models agree about it, as they do on normal images.
3. Sending: the ordinary transfer step (``transfer_attack``); a defended target answers or
   refuses each example (``rejected``), and ``fooled_target`` counts the ones that got through
   and fooled it.

The summary adds ``adaptive``: how the twin was built, the divergence KL(substitute || twin) of
the examples sent against that of normal images (the seed set), and the share of the examples
sent under the attacker's own estimate of a 98%-pass threshold on those normal images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from attacker.oracle import LabelOracle, buy
from attacker.transfer.evaluation import TransferProgress, transfer_attack
from mlcore.adversarial import PGD, TwinEvasivePGD
from mlcore.architectures import build_model
from mlcore.checkpoints import Checkpoint
from mlcore.datasets import ImageDataset
from mlcore.divergences import confident_indices, kl_divergence, pass_rate_threshold
from mlcore.training import fit, predict_logits, seed_everything

__all__ = [
    "MIN_TWIN_IMAGES",
    "Twin",
    "adaptive_step",
    "adaptive_transfer",
    "build_twin",
    "buy_twin_labels",
    "twin_divergence",
]

logger = logging.getLogger(__name__)

MIN_TWIN_IMAGES = 10  # fewer kept images cannot train a twin worth the name
OWN_PASS_RATE = 0.98  # the default operating point, estimated on the attacker's side


@dataclass
class Twin:
    """A sanitised twin of the substitute and how it was built."""

    model: nn.Module
    threshold: float
    bought: int  # labelled images it was chosen from
    kept: np.ndarray  # indices into them
    epochs: int

    def describe(self) -> dict[str, Any]:
        return {
            "twin_threshold": self.threshold,
            "twin_bought": self.bought,
            "twin_kept": len(self.kept),
            "twin_epochs": self.epochs,
        }


def build_twin(
    substitute: Checkpoint,
    images: torch.Tensor,
    labels: np.ndarray,
    *,
    threshold: float,
    epochs: int = 30,
    batch_size: int = 4,
    seed: int = 0,
) -> Twin:
    """Self-sanitise ``substitute`` on the labelled ``images`` (uint8) and train its twin.

    Raises ValueError naming the threshold when fewer than ``MIN_TWIN_IMAGES`` images survive.
    """
    labels = np.asarray(labels, dtype=np.int64)
    logits = predict_logits(substitute.model, images)
    kept = confident_indices(logits, labels, threshold)
    if len(kept) < MIN_TWIN_IMAGES:
        raise ValueError(
            f"twin threshold {threshold} keeps {len(kept)} of {len(labels)} bought images; "
            f"a twin needs at least {MIN_TWIN_IMAGES} (lower the threshold)"
        )
    logger.info("twin: %d of %d bought images at threshold %g", len(kept), len(labels), threshold)
    seed_everything(seed)
    model = build_model(substitute.arch, **substitute.arch_kwargs)
    index = torch.as_tensor(kept)
    fit(
        model,
        images[index],
        torch.as_tensor(labels[kept]),
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
    )
    return Twin(model, threshold, len(labels), kept, epochs)


def buy_twin_labels(
    oracle: LabelOracle, pool: ImageDataset, indices: np.ndarray
) -> tuple[torch.Tensor, np.ndarray, dict[str, int]]:
    """The labelled images the substitute was trained on, bought again through ``oracle`` (its
    answer cache makes that free when the same account and cache extracted the substitute): the
    images answered, their labels, and what this cost (the meter's report)."""
    before = oracle.meter.snapshot()
    images = pool.images[torch.as_tensor(np.asarray(indices, dtype=np.int64))]
    purchase = buy(oracle, images.numpy())
    if purchase.stopped_by is not None:
        raise ValueError(f"buying the twin's labels stopped: {purchase.message}")
    answered = torch.as_tensor(purchase.bought)
    return images[answered], purchase.labels[purchase.bought], oracle.meter.report(since=before)


def twin_divergence(substitute: nn.Module, twin: nn.Module, images: np.ndarray) -> np.ndarray:
    """KL(substitute || twin) per uint8 image, float64: the detector's statistic on our side."""
    batch = torch.from_numpy(np.ascontiguousarray(images))
    return kl_divergence(predict_logits(substitute, batch), predict_logits(twin, batch))


def adaptive_transfer(
    oracle: LabelOracle,
    substitute: nn.Module,
    twin: Twin,
    dataset: ImageDataset,
    *,
    attack: PGD,
    kl_weight: float,
    targeted: bool,
    seeds: int,
    seed: int = 0,
    noise_baseline: bool = True,
    send_all: bool = False,
    progress: TransferProgress | None = None,
) -> dict[str, Any]:
    """The transfer step with ``attack``'s PGD turned against the twin pair; returns the
    ``transfer.json`` summary with its ``adaptive`` section."""
    if type(attack) is not PGD:
        raise ValueError(f"the adaptive attack extends PGD, got {attack.name}")
    evasive = TwinEvasivePGD(twin=twin.model, kl_weight=kl_weight, **attack.params)
    result = transfer_attack(
        oracle,
        substitute,
        dataset,
        attack=evasive,
        targeted=targeted,
        seeds=seeds,
        seed=seed,
        noise_baseline=noise_baseline,
        send_all=send_all,
        progress=progress,
    )
    sent = result.crafted.adversarial[result.sent_index[result.received]]
    normal = dataset.images.numpy()
    normal_kl = twin_divergence(substitute, twin.model, normal)
    own_threshold = pass_rate_threshold(normal_kl, OWN_PASS_RATE)
    sent_kl = twin_divergence(substitute, twin.model, sent)
    summary = result.summary()
    summary["adaptive"] = {
        **twin.describe(),
        "kl_weight": kl_weight,
        "mean_kl_sent": float(sent_kl.mean()) if len(sent_kl) else None,
        "median_kl_sent": float(np.median(sent_kl)) if len(sent_kl) else None,
        "mean_kl_normal": float(normal_kl.mean()),
        "normal_images": len(normal),
        "own_threshold": own_threshold,
        "own_pass_rate": OWN_PASS_RATE,
        "sent_under_own_threshold": int((sent_kl <= own_threshold).sum()),
        "passed_and_fooled_target": summary["fooled_target"],
    }
    return summary


def adaptive_step(
    oracle: LabelOracle,
    seed_set: ImageDataset,
    *,
    checkpoint: Checkpoint,
    pool: ImageDataset,
    indices: list[int] | np.ndarray,
    twin_threshold: float,
    twin_epochs: int,
    kl_weight: float,
    attack: PGD,
    seed: int = 0,
    **step: Any,
) -> dict[str, Any]:
    """``attacker transfer --adaptive``: buy the substitute's labels again, build its twin,
    run the adaptive transfer step; the summary's ``adaptive`` section also says what the
    twin's labels cost (``twin_queries``)."""
    images, labels, cost = buy_twin_labels(oracle, pool, np.asarray(indices))
    twin = build_twin(
        checkpoint, images, labels, threshold=twin_threshold, epochs=twin_epochs, seed=seed
    )
    summary = adaptive_transfer(
        oracle, checkpoint.model, twin, seed_set, attack=attack, kl_weight=kl_weight, seed=seed,
        **step,
    )  # fmt: skip
    summary["adaptive"]["twin_queries"] = cost
    return summary
