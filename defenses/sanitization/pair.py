"""A sanitised pair: the unsanitised (parent) model, its sanitised twin, and the detector
threshold that goes with them, built once and saved as a self-describing checkpoint.

The sanitised checkpoint has the parent's architecture and dataset; its ``provenance`` names the
parent (file name and sha256), the method and threshold, the kept indices (into the parent's own
training split), both models' epochs, and the detector: score kind, target pass rate, the score
threshold and the pass rate it achieved on the calibration half of the held-out test split.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn

from defenses.sanitization.canonical import (
    CanonicalModel,
    canonical_sanitize,
    train_canonical_model,
)
from defenses.sanitization.detector import check_score_kind, detection_scores, flagged
from defenses.sanitization.detector import score_threshold as threshold_for_pass_rate
from defenses.sanitization.errors import SanitizationError, check_unit_interval
from defenses.sanitization.heldout import held_out_split
from defenses.sanitization.selfsan import self_sanitize
from mlcore.architectures import build_model
from mlcore.checkpoints import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from mlcore.datasets import DatasetError, load_dataset
from mlcore.training import accuracy, fit, predict_logits, seed_everything

logger = logging.getLogger(__name__)

Method = Literal["self", "canonical"]
METHODS: tuple[str, ...] = get_args(Method)
DEFAULT_EPOCHS = 10  # when the parent checkpoint does not say how long it trained
PROVENANCE_KEYS = (
    "parent",
    "parent_sha256",
    "method",
    "threshold",
    "score_kind",
    "pass_rate",
    "score_threshold",
)


@dataclass(frozen=True)
class Assessment:
    """Both models' logits for a batch, the detector's score per image and its decision."""

    parent_logits: torch.Tensor
    sanitized_logits: torch.Tensor
    scores: np.ndarray  # float64, (n,)
    flagged: np.ndarray  # bool, (n,)


@dataclass
class SanitizedPair:
    parent: nn.Module
    sanitized: nn.Module
    method: str
    threshold: float  # the sanitisation threshold (confidence on the label)
    score_kind: str
    pass_rate: float  # the target share of normal images let through
    score_threshold: float  # images scoring above it are flagged
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def assess(self, x: torch.Tensor) -> Assessment:
        """Score a batch ``x`` (float (n, C, H, W) in [0, 1], as ``as_model_input`` gives)."""
        if x.ndim != 4 or not torch.is_floating_point(x):
            raise SanitizationError(
                f"x must be a float (n, C, H, W) batch, got {x.dtype} of shape {tuple(x.shape)}"
            )
        parent_logits = predict_logits(self.parent, x)
        sanitized_logits = predict_logits(self.sanitized, x)
        scores = detection_scores(self.score_kind, parent_logits, sanitized_logits)
        return Assessment(
            parent_logits, sanitized_logits, scores, flagged(scores, self.score_threshold)
        )


def sanitized_checkpoint_path(parent_path: Path, method: str) -> Path:
    """Where a sanitised twin is kept by default: beside its parent, ``<stem>.sanitized-<method>.pt``."""
    return Path(parent_path).with_name(f"{Path(parent_path).stem}.sanitized-{method}.pt")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_sanitized_pair(
    parent_path: Path,
    *,
    method: str,
    threshold: float,
    pass_rate: float = 0.98,
    score: str = "kl",
    data_root: Path | None = None,
    fonts_dirs: list[Path] | tuple[Path, ...] = (),
    epochs: int | None = None,
    seed: int = 0,
    out_path: Path,
    system_fonts: bool = True,
    canonical_epochs: int | None = None,
    canonical: CanonicalModel | None = None,
    batch_size: int = 32,
) -> SanitizedPair:
    """Sanitise the parent's own training split with ``method``, train the sanitised model on
    the kept images, set the score threshold on the calibration half of the held-out test split,
    and save it at ``out_path`` (atomically, and only once everything above succeeded).

    ``canonical`` reuses a canonical model already trained (to sanitise at several thresholds);
    otherwise the ``canonical`` method trains one (``canonical_epochs``, default the twin's).
    ``system_fonts=False`` renders only matplotlib's bundled fonts and ``fonts_dirs``."""
    if method not in METHODS:
        raise SanitizationError(f"method must be one of {list(METHODS)}, got {method!r}")
    check_unit_interval("threshold", threshold)
    check_unit_interval("pass_rate", pass_rate)
    check_score_kind(score)
    for name, value in (("epochs", epochs), ("canonical_epochs", canonical_epochs)):
        if value is not None and value < 1:
            raise SanitizationError(f"{name} must be >= 1, got {value}")
    parent_path, out_path = Path(parent_path), Path(out_path)
    if out_path.resolve() == parent_path.resolve():
        raise SanitizationError(f"out_path must differ from the parent checkpoint {parent_path}")
    parent = _load(parent_path)
    try:
        train = load_dataset(parent.dataset, data_root=data_root)
    except DatasetError as exc:
        raise SanitizationError(str(exc)) from exc
    held_out = held_out_split(parent.dataset, data_root=data_root)
    parent_epochs = parent.metrics.get("epochs")
    sanitized_epochs = epochs or parent_epochs or DEFAULT_EPOCHS

    provenance: dict[str, Any] = {}
    if method == "self":
        kept = self_sanitize(parent.model, train, threshold)
    else:
        if canonical is None:  # refuses non-digit data before rendering a single font
            canonical = train_canonical_model(
                arch=parent.arch,
                arch_kwargs=parent.arch_kwargs,
                test=held_out.test,
                fonts_dirs=fonts_dirs,
                system_fonts=system_fonts,
                epochs=canonical_epochs or sanitized_epochs,
                seed=seed,
                batch_size=batch_size,
            )
        kept = canonical_sanitize(canonical, train, threshold)
        provenance["canonical"] = canonical.report
    logger.info(
        "%s sanitisation at %s keeps %d of %d training images",
        method,
        threshold,
        len(kept),
        len(train),
    )

    seed_everything(seed)
    sanitized = build_model(parent.arch, **parent.arch_kwargs)
    fit(
        sanitized,
        train.images[torch.as_tensor(kept)],
        train.labels[torch.as_tensor(kept)],
        epochs=sanitized_epochs,
        batch_size=batch_size,
        seed=seed,
    )

    calibration = held_out.calibration
    normal_scores = detection_scores(
        score,
        predict_logits(parent.model, calibration.images),
        predict_logits(sanitized, calibration.images),
    )
    cut = threshold_for_pass_rate(score, normal_scores, pass_rate)
    provenance |= {
        "parent": parent_path.name,
        "parent_sha256": file_sha256(parent_path),
        "method": method,
        "threshold": threshold,
        "train_data": parent.dataset,
        "train_size": len(train),
        "kept_count": len(kept),
        "kept_indices": kept.tolist(),
        "parent_epochs": parent_epochs,
        "sanitized_epochs": sanitized_epochs,
        "seed": seed,
        "score_kind": score,
        "pass_rate": pass_rate,
        "score_threshold": cut,
        "calibration_data": held_out.spec,
        "calibration_indices": held_out.calibration_indices.tolist(),
        "calibration_pass_rate": float(1.0 - flagged(normal_scores, cut).mean()),
    }
    test = held_out.test
    metrics = {
        "test_accuracy": accuracy(sanitized, test.images, test.labels),
        "parent_test_accuracy": accuracy(parent.model, test.images, test.labels),
        "test_data": held_out.spec,
        "train_size": len(kept),
        "epochs": sanitized_epochs,
    }
    save_checkpoint(
        out_path,
        sanitized,
        arch=parent.arch,
        arch_kwargs=parent.arch_kwargs,
        dataset=parent.dataset,
        metrics=metrics,
        provenance=provenance,
    )
    return _pair(parent, sanitized, provenance, metrics)


def load_sanitized_pair(path: Path, parent_path: Path) -> SanitizedPair:
    """Load a sanitised checkpoint with its parent, refusing a parent that is not the one it
    was built from (sha256), or a different architecture or dataset."""
    sanitized, parent = _load(Path(path)), _load(Path(parent_path))
    missing = [key for key in PROVENANCE_KEYS if key not in sanitized.provenance]
    if missing:
        raise SanitizationError(
            f"{path} is not a sanitised checkpoint (provenance lacks {missing})"
        )
    expected, actual = sanitized.provenance["parent_sha256"], file_sha256(Path(parent_path))
    if expected != actual:
        raise SanitizationError(
            f"{path} was built from parent {sanitized.provenance['parent']} (sha256 {expected[:12]}...), "
            f"but {parent_path} has sha256 {actual[:12]}..."
        )
    for what, mine, theirs in (
        (
            "architecture",
            (sanitized.arch, sanitized.arch_kwargs),
            (parent.arch, parent.arch_kwargs),
        ),
        ("dataset", sanitized.dataset, parent.dataset),
    ):
        if mine != theirs:
            raise SanitizationError(
                f"sanitised model {path} has {what} {mine}, its parent {parent_path} has {theirs}"
            )
    return _pair(parent, sanitized.model, sanitized.provenance, sanitized.metrics)


def _load(path: Path) -> Checkpoint:
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        raise SanitizationError(str(exc)) from exc


def _pair(
    parent: Checkpoint, sanitized: nn.Module, provenance: dict[str, Any], metrics: dict[str, Any]
) -> SanitizedPair:
    return SanitizedPair(
        parent=parent.model.eval(),
        sanitized=sanitized.eval(),
        method=provenance["method"],
        threshold=float(provenance["threshold"]),
        score_kind=provenance["score_kind"],
        pass_rate=float(provenance["pass_rate"]),
        score_threshold=float(provenance["score_threshold"]),
        provenance=provenance,
        metrics=metrics,
    )
