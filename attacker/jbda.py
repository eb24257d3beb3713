"""Jacobian-based dataset augmentation (JbDA), Papernot et al. 2017: PRADA's positive control.

Start from a small labelled seed set drawn from the attacker's pool; every substitute round
trains on everything labelled so far, then synthesises one new point per existing point,

    x' = clip(x + lambda_r * sign(d F_y(x) / dx), 0, 1),   y = the oracle's label of x,

and buys the oracle's labels for the new half, doubling the set. As in the authors' code
(cleverhans' MNIST black-box tutorial) the step's sign flips with the round: lambda_r = -lambda
for the first ``tau`` rounds, +lambda after. Label-only: the oracle only ever returns labels.
The last round is cut to fit the budget ``k`` exactly.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from attacker.extraction import ExtractionResult
from attacker.oracle import LabelOracle, buy
from attacker.selection import RandomSelector
from mlcore.architectures import build_model
from mlcore.datasets import ImageDataset
from mlcore.training import fit, seed_everything

logger = logging.getLogger(__name__)


def jacobian_step(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, lam: float
) -> torch.Tensor:
    """One augmentation step for float images ``x`` (n, C, H, W) in [0, 1]."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    chosen = logits.gather(1, labels.view(-1, 1)).sum()
    (gradient,) = torch.autograd.grad(chosen, x)
    return (x.detach() + lam * gradient.sign()).clamp(0.0, 1.0)


def jbda_extract(
    oracle: LabelOracle,
    pool: ImageDataset,
    *,
    k: int,
    arch: str = "lenet5",
    seed_size: int = 100,
    lam: float = 0.1,
    tau: int = 3,
    epochs_per_round: int = 10,
    batch_size: int = 32,
    seed: int = 0,
) -> ExtractionResult:
    """Spend at most ``k`` queries on JbDA; returns the last substitute and what was bought.

    The seed set is a class-proportional random sample of ``pool`` (by the pool's own labels). The images sent to
    the oracle after the first round are synthetic float32 points; ``indices`` in the result
    refer to the seed images only.
    """
    if not 1 <= seed_size <= len(pool):
        raise ValueError(f"seed_size must be in 1..{len(pool)}, got {seed_size}")
    if k < seed_size:
        raise ValueError(f"k must be at least seed_size={seed_size}, got {k}")
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    seeds = RandomSelector(seed=seed)(pool.images.numpy(), pool.labels.numpy(), k=seed_size).indices

    arch_kwargs = {"in_channels": pool.input_shape[0], "num_classes": pool.num_classes}
    images = pool.images[torch.as_tensor(seeds)].float().div(255.0)
    started = time.perf_counter()
    images, labels, stopped_by = _buy(oracle, images)
    round_index = 0
    while True:
        seed_everything(seed + round_index)
        model = build_model(arch, **arch_kwargs)
        fit(
            model,
            images,
            labels,
            epochs=epochs_per_round,
            batch_size=batch_size,
            seed=seed + round_index,
        )
        room = k - len(images)
        if room <= 0 or stopped_by is not None:
            break
        lam_r = -lam if round_index < tau else lam
        parents = torch.arange(len(images))[:room]
        synthetic = jacobian_step(model, images[parents], labels[parents], lam_r)
        synthetic, new_labels, stopped_by = _buy(oracle, synthetic)
        images = torch.cat([images, synthetic])
        labels = torch.cat([labels, new_labels])
        round_index += 1
        logger.info(
            "JbDA round %d: %d labelled points (lambda %+g)", round_index, len(images), lam_r
        )
    return ExtractionResult(
        substitute=model,
        arch=arch,
        arch_kwargs=arch_kwargs,
        indices=seeds,
        labels=labels.numpy(),
        queries_bought=len(images),
        train_seconds=time.perf_counter() - started,
        stopped_by=stopped_by,
    )


def _buy(
    oracle: LabelOracle, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """Labels for float ``images``, keeping only the images answered, and what stopped the
    purchase (None, "budget" or "blocked"), so the caller trains on what it has and stops."""
    purchase = buy(oracle, images.numpy().astype(np.float32))
    bought = torch.as_tensor(purchase.bought)
    return images[bought], torch.as_tensor(purchase.labels)[bought], purchase.stopped_by
