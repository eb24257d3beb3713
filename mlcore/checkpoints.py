"""Self-describing checkpoints: the weights travel with what is needed to rebuild the model.

``{arch, arch_kwargs, dataset, state_dict, metrics, provenance}`` (as nanoGPT saves its model
args), loaded with ``weights_only=True`` so a checkpoint can never run code. ``provenance`` says
where the weights came from when that matters to a consumer (JSON-ready values only): a sanitised
model names its parent, method, threshold and kept indices; a model trained on a subset or a
condensed set names its members.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlcore.architectures import build_model


class CheckpointError(ValueError):
    """A checkpoint file that is missing or does not describe a model."""


@dataclass
class Checkpoint:
    model: nn.Module
    arch: str
    arch_kwargs: dict[str, int]
    dataset: str
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    arch: str,
    arch_kwargs: dict[str, int] | None = None,
    dataset: str,
    metrics: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "dataset": dataset,
        "state_dict": model.state_dict(),
        "metrics": dict(metrics or {}),
        "provenance": dict(provenance or {}),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    missing = {"arch", "state_dict", "dataset"} - set(payload)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {sorted(missing)}")
    model = build_model(payload["arch"], **payload.get("arch_kwargs", {}))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return Checkpoint(
        model,
        payload["arch"],
        payload.get("arch_kwargs", {}),
        payload["dataset"],
        payload.get("metrics", {}),
        payload.get("provenance", {}),
    )
