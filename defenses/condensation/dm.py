"""Dataset condensation by distribution matching (DM; Zhao and Bilen, WACV 2023).

Per iteration a freshly initialised ConvNet, never trained: for every class, the squared
distance between the mean embedding (the output of everything but the last layer) of a batch
of real images and that of the class's synthetic images, summed over classes; one SGD step on
the synthetic pixels. No bi-level optimisation, hence far cheaper than DC per iteration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from defenses.condensation.common import CondensationConfig

# The authors ran 20,000 iterations with 256 real images per class (lr 1 on normalised pixels);
# these defaults finish in minutes on 2 CPU cores (docs/benchmarks.md).
DEFAULT_ITERATIONS = 100
DEFAULT_BATCH_REAL = 64
DEFAULT_LR_IMAGES = 1.0


def defaults(ipc: int) -> dict[str, int | float]:
    return {
        "iterations": DEFAULT_ITERATIONS,
        "batch_real": DEFAULT_BATCH_REAL,
        "lr_images": DEFAULT_LR_IMAGES,
    }


def embedding(net: nn.Sequential) -> nn.Sequential:
    """The ConvNet without its classifier, frozen (DM never trains the network)."""
    embed = net[:-1]
    for param in embed.parameters():
        param.requires_grad_(False)
    return embed


def matching_loss(
    net: nn.Sequential, synthetic: torch.Tensor, real_by_class: Sequence[torch.Tensor], ipc: int
) -> torch.Tensor:
    """Sum over classes of the squared distance between mean real and mean synthetic
    embeddings under ``net``; differentiable in ``synthetic``."""
    embed = embedding(net)
    total = synthetic.new_zeros(())
    for cls, real in enumerate(real_by_class):
        with torch.no_grad():
            mean_real = embed(real).mean(dim=0)
        mean_synthetic = embed(synthetic[cls * ipc : (cls + 1) * ipc]).mean(dim=0)
        total = total + (mean_real - mean_synthetic).pow(2).sum()
    return total


def matching_steps(
    net: nn.Module,
    synthetic: torch.Tensor,
    draw_real: Callable[[], list[torch.Tensor]],
    config: CondensationConfig,
    generator: torch.Generator,
) -> Iterator[torch.Tensor]:
    """One DM iteration on a fresh ``net``: a single matching loss (the caller steps the
    images on it)."""
    assert isinstance(net, nn.Sequential)
    yield matching_loss(net, synthetic, draw_real(), config.ipc)
