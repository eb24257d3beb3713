"""What ``defender protect`` writes: the protected set as an npz the training API and the
dataset registry (``npz:PATH``) accept, and a PNG of clean / noise / protected rows (as MI-UE's
Fig. 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from defenses.unlearnable.base import ProtectionResult


def save_protected(path: Path, result: ProtectionResult) -> Path:
    """``images`` float32 (n, C, H, W) in [0, 1] and ``labels`` int64 (the upload format), plus
    ``noise`` (float32, protected - clean) and ``info`` (a JSON string; read without pickle).
    A label-agnostic run on a pool without labels writes no ``labels`` (an attacker's pool)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "images": result.images.detach().clamp(0, 1).numpy().astype(np.float32),
        "noise": result.noise.detach().numpy().astype(np.float32),
        "info": np.array(json.dumps(result.info, sort_keys=True)),
    }
    if result.labels is not None:
        arrays["labels"] = result.labels.numpy().astype(np.int64)
    with path.open("wb") as handle:
        np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]
    return path


def shown_indices(labels: torch.Tensor | None, count: int, per_class: int) -> list[int]:
    """The first ``per_class`` images of each class (the first ones overall without labels)."""
    if labels is None:
        return list(range(min(count, 10 * per_class)))
    chosen: list[int] = []
    for cls in torch.unique(labels).tolist():
        chosen += torch.nonzero(labels == cls).flatten()[:per_class].tolist()
    return chosen


def save_figure(
    path: Path, clean: torch.Tensor, result: ProtectionResult, *, per_class: int = 2
) -> Path:
    """Three rows, clean / noise / protected, ``per_class`` images of each class. The noise row
    is rescaled from [-eps, eps] to [0, 1] (grey = no noise) so it is visible at any eps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = float(result.info.get("eps", 1.0))
    index = shown_indices(result.labels, len(clean), per_class)
    rows = {
        "clean": clean[index],
        "noise (rescaled)": (result.noise[index] / (2 * eps) + 0.5).clamp(0, 1),
        "protected": result.images[index],
    }
    figure, axes = plt.subplots(3, len(index), figsize=(0.8 * len(index), 2.8), squeeze=False)
    for row, (title, images) in enumerate(rows.items()):
        for column, image in enumerate(images):
            axis = axes[row][column]
            picture = image.permute(1, 2, 0).numpy()
            axis.imshow(
                picture.squeeze(-1) if picture.shape[-1] == 1 else picture,
                cmap="gray",
                vmin=0,
                vmax=1,
            )
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row][0].set_ylabel(title, fontsize=7)
    figure.suptitle(f"{result.info.get('method')} eps {eps:.4g}", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
