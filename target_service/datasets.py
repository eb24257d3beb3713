"""Uploaded datasets: the npz format a client sends, its validation, and where it is kept.

An upload is an ``.npz`` holding ``images`` (uint8 ``(N, C, H, W)`` or ``(N, H, W)``, or
float32 in [0, 1]) and ``labels`` (integers 0..classes-1). The route streams the body to a
temporary file under ``<state_dir>/datasets`` (so a large upload is never whole in memory),
then ``validate_npz`` reads it with ``allow_pickle=False`` and the file is renamed to
``<dataset_id>.npz``. Every refusal names what was wrong; nothing is kept from a refused upload.

An upload may also hold ``provenance``, a JSON string as ``defender condense`` writes it; its
``members`` (``{"dataset": "name:split", "indices": [...]}``, the real images a condensed set was
made from) go into the checkpoint of a model trained on it, so membership challenges can be
opened on that model (``declared_members``).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlcore.architectures import accepting_architectures
from mlcore.datasets import DatasetError, load_dataset
from target_service.errors import InvalidInput, PayloadTooLarge

CHANNELS = (1, 3)
MIN_SIDE, MAX_SIDE = 8, 256


@dataclass(frozen=True)
class DatasetSummary:
    n: int
    shape: list[int]  # (C, H, W) of one image
    dtype: str
    classes: int


def validate_npz(
    path: Path, *, classes: int | None, max_classes: int, max_unpacked_bytes: int
) -> DatasetSummary:
    """Check an uploaded file; raise InvalidInput (or PayloadTooLarge) naming the problem."""
    if not zipfile.is_zipfile(path):
        raise InvalidInput("the body is not an .npz file (numpy.savez)", code="not_npz")
    with zipfile.ZipFile(path) as archive:
        unpacked = sum(info.file_size for info in archive.infolist())
    if unpacked > max_unpacked_bytes:
        raise PayloadTooLarge(
            f"the npz unpacks to {unpacked} bytes, over the limit of {max_unpacked_bytes}",
            code="dataset_too_large",
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = sorted({"images", "labels"} - set(npz.files))
            if missing:
                raise InvalidInput(
                    f"the npz lacks {missing}; it holds {sorted(npz.files)[:10]}",
                    code="missing_array",
                )
            images, labels = npz["images"], npz["labels"]
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InvalidInput(f"the npz cannot be read: {str(exc)[:200]}", code="not_npz") from None
    return _validate_arrays(images, labels, classes=classes, max_classes=max_classes)


def _validate_arrays(
    images: np.ndarray, labels: np.ndarray, *, classes: int | None, max_classes: int
) -> DatasetSummary:
    if images.dtype not in (np.uint8, np.float32):
        raise InvalidInput(
            f"images must be uint8 or float32, got {images.dtype}", code="invalid_dtype"
        )
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or len(images) == 0:
        raise InvalidInput(
            f"images must have shape (N, C, H, W) or (N, H, W) with N >= 1, got {list(images.shape)}",
            code="invalid_shape",
        )
    channels, height, width = (int(side) for side in images.shape[1:])
    image_shape = (channels, height, width)
    if channels not in CHANNELS or not all(
        MIN_SIDE <= side <= MAX_SIDE for side in (height, width)
    ):
        raise InvalidInput(
            f"images of shape {list(image_shape)} fit no architecture: need {CHANNELS} channels "
            f"and sides of {MIN_SIDE}..{MAX_SIDE} pixels",
            code="invalid_shape",
        )
    if images.dtype == np.float32:
        if not np.isfinite(images).all():
            raise InvalidInput("float images contain NaN or infinity", code="invalid_values")
        low, high = float(images.min()), float(images.max())
        if low < 0.0 or high > 1.0:
            raise InvalidInput(
                f"float images must lie in [0, 1], got values in [{low:g}, {high:g}]",
                code="invalid_values",
            )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise InvalidInput(
            f"labels must be a 1-D integer array, got {labels.dtype} of shape {list(labels.shape)}",
            code="invalid_labels",
        )
    if len(labels) != len(images):
        raise InvalidInput(
            f"images and labels must have the same length, got {len(images)} and {len(labels)}",
            code="length_mismatch",
        )
    low_label, high_label = int(labels.min()), int(labels.max())
    if low_label < 0:
        raise InvalidInput(f"labels must be >= 0, got {low_label}", code="invalid_labels")
    if classes is None:
        classes = high_label + 1
    if not 2 <= classes <= max_classes:
        raise InvalidInput(
            f"a dataset needs 2..{max_classes} classes, got {classes}", code="invalid_labels"
        )
    if high_label >= classes:
        raise InvalidInput(
            f"labels must be in 0..{classes - 1}, got {high_label}", code="invalid_labels"
        )
    if not accepting_architectures(image_shape, classes):
        raise InvalidInput(
            f"no architecture accepts images of shape {list(image_shape)}", code="invalid_shape"
        )
    return DatasetSummary(len(images), list(image_shape), str(images.dtype), classes)


def declared_members(path: Path, *, data_root: Path | None) -> dict[str, Any] | None:
    """The members an upload declares in its ``provenance`` (None if it declares none), checked
    as far as the service can: the dataset must be a registry split it can load and the indices
    ints inside its range, else InvalidInput. Whether the images really came from
    those members cannot be checked; the checkpoint records them as declared by the upload."""
    with np.load(path, allow_pickle=False) as npz:
        if "provenance" not in npz.files:
            return None
        stored = npz["provenance"]
    try:
        provenance = json.loads(str(stored.item())) if stored.ndim == 0 else None
    except (ValueError, TypeError):
        provenance = None
    if not isinstance(provenance, dict):
        raise InvalidInput(
            "provenance must be one JSON object string (as defender condense writes it)",
            code="invalid_provenance",
        )
    members = provenance.get("members")
    if members is None:
        return None
    if not isinstance(members, dict) or not isinstance(members.get("indices"), list):
        raise InvalidInput(
            'provenance members must look like {"dataset": "name:split", "indices": [...]}',
            code="invalid_provenance",
        )
    spec = str(members.get("dataset"))
    try:
        split_size = len(load_dataset(spec, data_root=data_root))
    except DatasetError as exc:
        raise InvalidInput(
            f"provenance members name {spec[:100]!r}, not a dataset the service has: {exc}",
            code="invalid_provenance",
        ) from None
    indices = members["indices"]
    wrong = [i for i in indices if type(i) is not int or not 0 <= i < split_size]
    if not indices or wrong:
        raise InvalidInput(
            f"provenance members must be indices in 0..{split_size - 1} of {spec}, got "
            + (f"{len(wrong)} outside it, e.g. {str(wrong[0])[:20]}" if wrong else "none"),
            code="invalid_provenance",
        )
    return {"dataset": spec, "indices": sorted(set(indices))}


def load_arrays(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored dataset as (images (N, C, H, W) uint8 or float32, labels int64)."""
    with np.load(path, allow_pickle=False) as npz:
        images, labels = npz["images"], npz["labels"]
    if images.ndim == 3:
        images = images[:, None]
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))


class DatasetFiles:
    """Where uploads land: ``<root>/<dataset_id>.npz``, written via a temporary file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, dataset_id: str) -> Path:
        return self.root / f"{dataset_id}.npz"

    def temporary(self, dataset_id: str) -> Path:
        return self.root / f".{dataset_id}.upload"

    def keep(self, temporary: Path, dataset_id: str) -> Path:
        """fsync and rename an accepted upload into place."""
        with temporary.open("rb") as handle:
            os.fsync(handle.fileno())
        final = self.path(dataset_id)
        temporary.replace(final)
        return final

    def remove(self, dataset_id: str) -> None:
        self.path(dataset_id).unlink(missing_ok=True)
