"""Dataset condensation by gradient matching (DC; Zhao, Mopuri and Bilen, ICLR 2021).

Per iteration a freshly initialised ConvNet; ``outer_loop`` times: for every class, the
gradient of the cross-entropy on a batch of real images of that class and on the class's
synthetic images, their distance (per layer, 1 - cosine per output row, summed; biases and
norms ignored, as in the authors' ``distance_wb``), summed over classes, and one SGD step on
the synthetic pixels; between two such updates the network itself is trained ``inner_loop``
epochs on the synthetic set (SGD, lr 0.01), so the images are matched along its trajectory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from defenses.condensation.common import DC_LOOPS, CondensationConfig, synthetic_labels
from mlcore.training import train_epoch

LR_NETWORK = 0.01  # the authors' lr_net
BATCH_SYNTHETIC = 256  # the authors' batch_train for the inner loop

# The authors ran 1,000 iterations with 256 real images per class; on 2 CPU cores that is
# days at 10 images per class. These defaults finish in minutes (docs/benchmarks.md).
DEFAULT_ITERATIONS = 4
DEFAULT_BATCH_REAL = 32
DEFAULT_LR_IMAGES = 0.1  # the authors' lr_img
MAX_DEFAULT_INNER = 5  # the authors' inner loop is 50 at 10 images per class


def defaults(ipc: int) -> dict[str, int | float]:
    outer, inner = DC_LOOPS[min(DC_LOOPS, key=lambda known: abs(known - ipc))]
    return {
        "iterations": DEFAULT_ITERATIONS,
        "batch_real": DEFAULT_BATCH_REAL,
        "lr_images": DEFAULT_LR_IMAGES,
        "outer_loop": outer,
        "inner_loop": min(inner, MAX_DEFAULT_INNER),
    }


def gradient_distance(
    synthetic: Sequence[torch.Tensor], real: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Sum over layers of sum over output rows of (1 - cosine) between two gradients."""
    total = synthetic[0].new_zeros(())
    for grad_synthetic, grad_real in zip(synthetic, real, strict=True):
        if grad_real.ndim == 1:  # biases and instance-norm affine: ignored by the authors
            continue
        rows = grad_real.shape[0]
        cosine = F.cosine_similarity(
            grad_synthetic.reshape(rows, -1), grad_real.reshape(rows, -1), dim=1, eps=1e-6
        )
        total = total + (1 - cosine).sum()
    return total


def matching_loss(
    net: nn.Module, synthetic: torch.Tensor, real_by_class: Sequence[torch.Tensor], ipc: int
) -> torch.Tensor:
    """Gradient-matching loss of ``synthetic`` (class-major, ``ipc`` per class) against one real
    batch per class, for the network ``net``; differentiable in ``synthetic``."""
    params = [p for p in net.parameters() if p.requires_grad]
    total = synthetic.new_zeros(())
    for cls, real in enumerate(real_by_class):
        real_target = torch.full((len(real),), cls)
        grads_real = torch.autograd.grad(F.cross_entropy(net(real), real_target), params)
        mine = synthetic[cls * ipc : (cls + 1) * ipc]
        grads_synthetic = torch.autograd.grad(
            F.cross_entropy(net(mine), torch.full((ipc,), cls)), params, create_graph=True
        )
        total = total + gradient_distance(grads_synthetic, [g.detach() for g in grads_real])
    return total


def matching_steps(
    net: nn.Module,
    synthetic: torch.Tensor,
    draw_real: Callable[[], list[torch.Tensor]],
    config: CondensationConfig,
    generator: torch.Generator,
) -> Iterator[torch.Tensor]:
    """One DC iteration on a fresh ``net``: yields ``outer_loop`` matching losses (the caller
    steps the images on each) and trains ``net`` on the updated images between them."""
    assert config.outer_loop is not None and config.inner_loop is not None  # resolved config
    labels = synthetic_labels(config.ipc, len(synthetic) // config.ipc)
    net_optimizer = torch.optim.SGD(net.parameters(), lr=LR_NETWORK)
    net.train()
    for outer in range(config.outer_loop):
        yield matching_loss(net, synthetic, draw_real(), config.ipc)
        if outer == config.outer_loop - 1:
            break
        frozen = synthetic.detach()
        for _ in range(config.inner_loop):
            train_epoch(
                net, net_optimizer, frozen, labels, batch_size=BATCH_SYNTHETIC, generator=generator
            )
