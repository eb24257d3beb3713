"""What every unlearnable-examples method shares: the input checks, the L-inf projection, the
result, the progress callback and the resumable state file.

A method is a callable registered by name in ``defenses.unlearnable.METHODS``::

    fn(images, labels, *, eps, seed, progress=None, resume_path=None, **options) -> ProtectionResult

``images`` are float32 (N, C, H, W) in [0, 1]; ``labels`` int64 (N,) or None for a
label-agnostic method (a class-wise method given None raises, saying it needs labels). The noise
it returns stays within [-eps, eps] and the protected images within [0, 1] (``project``).
``progress(done, total, detail)`` is called after each round; ``resume_path`` names a state file
written after each round (``save_state``) and picked up by a rerun of the same call
(``load_state``). Errors::

    ValueError
     └── UnlearnableError   bad eps, images, labels, option or state file; the message names it
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

__all__ = [
    "Method",
    "Progress",
    "ProtectionResult",
    "UnlearnableError",
    "check_eps",
    "check_images",
    "check_labels",
    "clip_straight_through",
    "coarse_shape",
    "coarse_to_full",
    "load_state",
    "project",
    "require_labels",
    "run_fingerprint",
    "save_state",
]

Progress = Callable[[int, int, str], None]  # (rounds done, round limit, a short status line)


class UnlearnableError(ValueError):
    """An eps, image set, label set, option or state file a method cannot use."""


@dataclass(frozen=True)
class ProtectionResult:
    """A protected image set: ``images`` = clean + ``noise``, clipped to [0, 1] (float32,
    N x C x H x W); ``labels`` the given labels passed through (int64, N); ``info`` a JSON-ready
    dict with at least ``method``, ``eps`` and ``seed`` plus the method's facts (rounds run, the
    stopping value, the surrogate's source and accuracy, per-image ``clusters``...)."""

    images: torch.Tensor
    labels: torch.Tensor
    noise: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


class Method(Protocol):
    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        *,
        eps: float,
        seed: int,
        progress: Progress | None = None,
        resume_path: Path | None = None,
        **options: Any,
    ) -> ProtectionResult: ...


def check_eps(eps: float) -> float:
    """The L-inf budget as a float; refuses anything outside (0, 1] (images live in [0, 1])."""
    value = float(eps)
    if not 0 < value <= 1:  # also refuses NaN
        raise UnlearnableError(f"eps must be in (0, 1] (images are in [0, 1]), got {eps}")
    return value


def check_images(images: torch.Tensor) -> torch.Tensor:
    """Float (N, C, H, W) images in [0, 1], as float32; the error names the shape or range."""
    if images.ndim != 4 or len(images) == 0:
        raise UnlearnableError(
            f"images must be a non-empty (N, C, H, W) batch, got shape {list(images.shape)}"
        )
    if not images.is_floating_point():
        raise UnlearnableError(f"images must be float in [0, 1], got dtype {images.dtype}")
    low, high = float(images.min()), float(images.max())
    if not (low >= 0.0 and high <= 1.0):  # NaN fails both comparisons
        raise UnlearnableError(f"images must lie in [0, 1], got values in [{low:g}, {high:g}]")
    return images.float()


def check_labels(labels: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """int64 labels, one per image, non-negative (None passes through for label-agnostic
    methods)."""
    if labels is None:
        return None
    if labels.ndim != 1 or len(labels) != count:
        raise UnlearnableError(
            f"need one label per image ({count}), got labels of shape {list(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise UnlearnableError(f"labels must be integers, got dtype {labels.dtype}")
    if len(labels) and int(labels.min()) < 0:
        raise UnlearnableError(f"labels must be >= 0, got {int(labels.min())}")
    return labels.long()


def require_labels(labels: torch.Tensor | None, method: str) -> torch.Tensor:
    """The labels of a method that cannot do without them."""
    if labels is None:
        raise UnlearnableError(
            f"{method} is class-wise (or trains on labels) and needs labels; this pool has none"
        )
    return labels


def project(images: torch.Tensor, noise: torch.Tensor, eps: float) -> torch.Tensor:
    """The noise clipped to [-eps, eps] and then cut so that images + noise stays in [0, 1]
    (the second cut only shrinks it, so the first bound still holds)."""
    bounded = noise.clamp(-eps, eps)
    return (images + bounded).clamp(0.0, 1.0) - images


def coarse_shape(shape: tuple[int, ...] | torch.Size, block: int) -> tuple[int, ...]:
    """The shape of a noise that is constant on ``block`` x ``block`` squares of images of
    ``shape`` (C, H, W): (C, ceil(H / block), ceil(W / block)). The one check of ``block``."""
    channels, height, width = shape
    if block < 1:
        raise UnlearnableError(f"block must be >= 1, got {block}")
    if block > min(height, width):
        raise UnlearnableError(
            f"block must be <= the image side ({min(height, width)}), got {block}"
        )
    return channels, -(-height // block), -(-width // block)


def coarse_to_full(noise: torch.Tensor, *, size: tuple[int, ...]) -> torch.Tensor:
    """Coarse noise (N, C, h, w) blown up to (N, C, *size), each value over its square.

    Why: on MNIST a trainer learns the digits in its second epoch, and pixel-fine noise is read
    after them if at all; noise constant on large squares (a change of brightness per region) is
    read first. ``block`` = 1 is the paper's pixel-wise noise."""
    if tuple(noise.shape[2:]) == tuple(size):
        return noise
    return F.interpolate(noise, size=size, mode="nearest")


def clip_straight_through(images: torch.Tensor) -> torch.Tensor:
    """``images.clamp(0, 1)`` forward; the identity backward."""
    return images + (images.clamp(0, 1) - images).detach()


def run_fingerprint(
    method: str,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    eps: float,
    seed: int,
    options: dict[str, Any],
) -> str:
    """A digest of everything that determines a run: a state file is picked up only by the run
    that wrote it (same method, data, eps, seed and options)."""
    digest = hashlib.sha256()
    digest.update(images.detach().float().contiguous().numpy().tobytes())
    if labels is not None:
        digest.update(labels.detach().long().contiguous().numpy().tobytes())
    settings = {"method": method, "eps": eps, "seed": seed, "options": options}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def save_state(path: Path, fingerprint: str, state: dict[str, Any]) -> None:
    """Write a round's state atomically (temp file + rename), so a kill leaves the last round's.
    ``state`` holds tensors, numbers, strings, lists and dicts (``torch.save``-able, read back
    with ``weights_only=True``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"fingerprint": fingerprint, "state": state}, tmp)
    tmp.replace(path)


def load_state(path: Path | None, fingerprint: str) -> dict[str, Any] | None:
    """The state ``save_state`` wrote for this very run, or None when there is no file; a file
    of another run (or an unreadable one) is an error, never silently overwritten."""
    if path is None or not Path(path).exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt file
        raise UnlearnableError(f"cannot read the resume state {path}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("fingerprint") != fingerprint:
        raise UnlearnableError(
            f"resume state {path} belongs to another run (other method, data, eps, seed or "
            "options): delete it or use another path"
        )
    state: dict[str, Any] = payload["state"]
    return state
