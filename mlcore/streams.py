"""A benign client's query stream: the defender calibrates detectors on it, and the attacker's
benign-client simulator sends it, so both sides share this one model of a normal user.

The model: a client sends natural images in random order, and now and then re-sends one of its
recent queries, exactly or as a near-duplicate (the same image with a little pixel noise), as
real users do (retries, the same document scanned twice, a dashboard polling the same input).

``benign_stream(images, n, repeat_rate=0.1, noise=0.02, seed=0)``: each query is, with
probability ``repeat_rate``, a repeat of one of the previous ``recent`` queries (uniformly
chosen) plus Gaussian pixel noise of standard deviation ``noise`` (in [0, 1] pixel units,
clipped to [0, 1]; uint8 images are rounded back to uint8); otherwise the next image of a
random permutation of ``images`` (a fresh permutation each time the images run out). With
``repeat_rate=0`` it is the DRMI paper's benign client, who "submits random queries".

``NEAR_DUPLICATE_RATE`` and ``NEAR_DUPLICATE_NOISE`` are the benign client that
``attacker simulate-benign`` plays by default and that detector calibration must not flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["NEAR_DUPLICATE_NOISE", "NEAR_DUPLICATE_RATE", "BenignStream", "benign_stream"]

NEAR_DUPLICATE_RATE = 0.1  # share of queries re-sending one of the recent ones
NEAR_DUPLICATE_NOISE = 0.02  # pixel noise (std, [0, 1] units) on each re-sent query


@dataclass(frozen=True)
class BenignStream:
    """The queries (same dtype and image shape as the source images), the index of the source
    image behind each query (labels: ``source_labels[stream.source]``) and which queries are
    repeats of an earlier query."""

    images: Tensor
    source: Tensor  # (n,) int64
    repeated: Tensor  # (n,) bool


def benign_stream(
    images: Any,
    n: int,
    *,
    repeat_rate: float = 0.0,
    noise: float = 0.0,
    recent: int = 100,
    seed: int = 0,
) -> BenignStream:
    """``n`` queries of a benign client drawing from ``images`` (see the module docstring)."""
    images = images if isinstance(images, Tensor) else torch.as_tensor(np.asarray(images))
    if images.ndim < 2 or len(images) < 1:
        raise ValueError(f"images must have shape (N, ...) with N >= 1, got {tuple(images.shape)}")
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    n = _check_int("n", n, low=1)
    if (
        isinstance(repeat_rate, bool)
        or not isinstance(repeat_rate, (int, float, np.integer, np.floating))
        or not 0.0 <= repeat_rate < 1.0
    ):
        raise ValueError(f"repeat_rate must be a number in [0, 1), got {repeat_rate!r}")
    if (
        isinstance(noise, bool)
        or not isinstance(noise, (int, float, np.integer, np.floating))
        or not math.isfinite(noise)
        or noise < 0
    ):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    recent = _check_int("recent", recent, low=1)
    seed = _check_int("seed", seed, low=0)

    rng = np.random.default_rng(seed)
    source = np.empty(n, dtype=np.int64)
    repeated = np.zeros(n, dtype=bool)
    fresh: np.ndarray = np.empty(0, dtype=np.int64)
    position = 0
    for i in range(n):
        if i > 0 and rng.random() < repeat_rate:
            source[i] = source[rng.integers(max(0, i - recent), i)]
            repeated[i] = True
            continue
        if position == len(fresh):
            fresh, position = rng.permutation(len(images)), 0
        source[i] = fresh[position]
        position += 1

    out = images[torch.from_numpy(source)].clone()
    if noise > 0 and repeated.any():
        mask = torch.from_numpy(repeated)
        scale = 255.0 if images.dtype == torch.uint8 else 1.0
        clean = out[mask].double() / scale
        jitter = torch.from_numpy(rng.normal(0.0, noise, size=tuple(clean.shape)))
        noisy = (clean + jitter).clamp_(0.0, 1.0) * scale
        out[mask] = noisy.round_().to(out.dtype) if scale == 255.0 else noisy.to(out.dtype)
    return BenignStream(out, torch.from_numpy(source), torch.from_numpy(repeated))


def _check_int(name: str, value: object, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(
            f"{name} must be an integer >= {low}, got {value!r}"
            if not isinstance(value, (int, np.integer))
            else f"{name} must be >= {low}, got {value}"
        )
    return int(value)
