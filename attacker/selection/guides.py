"""Guides for the model-dependent strategies (DRMI paper, Section 5.4): what a model says about
each pool image.

* ``probabilities_from_model``: softmax class probabilities, the input of HCP / LCP and
  (PCA +) K-means. The paper uses the target's; offline, a local checkpoint (for instance a
  substitute trained on a few bought labels) stands in for it.
* ``activations_from_model``: TRACE's activation trace. The paper's trace is one bit per neuron
  of the model ("1 if activated", length = all neurons); here a neuron is one output unit of a
  ReLU (every channel at every position of a conv layer, every hidden unit of a dense layer), and
  activated means > 0. The logits layer has no activation function, so it is not part of it.

``guide_from_checkpoint`` computes either from a checkpoint file and says where it came from,
for the selection file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from attacker.selection.base import GuideKind

__all__ = ["activations_from_model", "guide_from_checkpoint", "probabilities_from_model"]

_BATCH = 500


def probabilities_from_model(model: nn.Module, images: Any) -> np.ndarray:
    """Softmax probabilities (n, classes), float64, of ``images`` (uint8 or float in [0, 1])."""
    logits = torch.cat(list(_forward(model, images, hooks=())))
    return torch.softmax(logits.double(), dim=1).numpy()


def activations_from_model(model: nn.Module, images: Any) -> np.ndarray:
    """Activation trace (n, units), bool: which ReLU outputs are > 0, in forward order."""
    relus = [module for module in model.modules() if isinstance(module, nn.ReLU)]
    if not relus:
        raise ValueError(f"{type(model).__name__} has no ReLU layers: no activation trace")
    batch_traces: list[torch.Tensor] = []
    current: list[torch.Tensor] = []

    def record(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        current.append((output > 0).flatten(start_dim=1))  # copied before an in-place op

    for _ in _forward(model, images, hooks=[(relu, record) for relu in relus]):
        batch_traces.append(torch.cat(current, dim=1))
        current.clear()
    return torch.cat(batch_traces).numpy()


def guide_from_checkpoint(
    path: str | Path, kind: GuideKind, images: Any
) -> tuple[np.ndarray, dict[str, Any]]:
    """The ``kind`` guide of ``images`` from the model in checkpoint ``path``, and a JSON-ready
    record of where it came from (checkpoint path and sha256, arch, the data it was trained on)."""
    from mlcore.checkpoints import load_checkpoint

    path = Path(path)
    checkpoint = load_checkpoint(path)  # CheckpointError (a ValueError) names a bad file
    compute = probabilities_from_model if kind == "probabilities" else activations_from_model
    try:
        guide = compute(checkpoint.model, images)
    except RuntimeError as exc:  # the model cannot take these images
        raise ValueError(
            f"guide model {path} ({checkpoint.arch}) cannot take the pool's images of shape "
            f"{list(np.shape(images)[1:])}: {str(exc)[:200]}"
        ) from None
    source = {
        "kind": kind,
        "source": "model",
        "checkpoint": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "arch": checkpoint.arch,
        "trained_on": checkpoint.dataset,
    }
    return guide, source


@torch.no_grad()
def _forward(
    model: nn.Module, images: Any, *, hooks: Iterable[tuple[nn.Module, Callable[..., None]]]
) -> Iterator[torch.Tensor]:
    """Yield the logits of ``images`` batch by batch, in eval mode, with ``hooks`` attached."""
    from mlcore.training import as_model_input

    inputs = as_model_input(torch.as_tensor(np.asarray(images)))
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    model.eval()
    try:
        for start in range(0, len(inputs), _BATCH):
            yield model(inputs[start : start + _BATCH])
    finally:
        for handle in handles:
            handle.remove()
