"""The Adversarial Robustness Toolbox (ART) against the range: researchers bring the attacks they
already use, and every query still goes through our oracle, meter and answer cache.

``art_victim(oracle, ...)`` presents any ``LabelOracle`` (an ``HttpOracle`` in practice) as an
ART ``BlackBoxClassifier``. The target is label-only, so the classifier answers one-hot rows,
built here: ART's own label-only postprocessor (``ClassLabels``, 1.20.1) is not used because in a
batch it marks every class predicted for any image in every row (``class_labels[:, argmax] = 1``). ``art_substitute(...)`` wraps a fresh model of ours
as the ART ``PyTorchClassifier`` that ART's extraction attacks train ("thieved classifier").

ART's attacks have no notion of a partial purchase: a 402 or 403 part-way raises the oracle's
``BudgetExhausted`` / ``Blocked`` out of the attack (with an answer cache, a re-run with more
budget does not pay again for what was bought).

Needs the optional extra: ``pip install 'mlaas-range[art]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from attacker.oracle import LabelOracle
from mlcore.architectures import build_model

if TYPE_CHECKING:
    from art.estimators.classification import BlackBoxClassifier, PyTorchClassifier

__all__ = ["art_substitute", "art_victim", "one_hot_labels"]

ART_MISSING = "ART is not installed: pip install 'mlaas-range[art]'"


def one_hot_labels(oracle: LabelOracle, images: np.ndarray, *, nb_classes: int) -> np.ndarray:
    """ART's float images in [0, 1] -> the oracle's labels as one-hot float32 rows.

    The images go to the oracle as uint8 (x * 255, rounded), what the service accepts: images
    that came from uint8 data arrive unchanged. A label the service withheld (-1, e.g. an input
    defence answered null) is an all-zero row.
    """
    x = np.asarray(images)
    if not np.isfinite(x).all() or x.min(initial=0.0) < 0.0 or x.max(initial=0.0) > 1.0:
        raise ValueError("ART inputs must be finite pixel values in [0, 1] (clip_values)")
    labels = np.asarray(oracle.predict_labels(np.rint(x * 255.0).astype(np.uint8)))
    if labels.shape != (len(x),):
        raise ValueError(f"the oracle returned {labels.shape} labels for {len(x)} images")
    if labels.max(initial=-1) >= nb_classes:
        raise ValueError(f"the oracle returned label {labels.max()} but nb_classes={nb_classes}")
    rows = np.zeros((len(x), nb_classes), dtype=np.float32)
    answered = labels >= 0
    rows[np.flatnonzero(answered), labels[answered]] = 1.0
    return rows


def art_victim(
    oracle: LabelOracle, *, input_shape: tuple[int, ...], nb_classes: int
) -> BlackBoxClassifier:
    """``oracle`` as an ART ``BlackBoxClassifier`` taking float images in [0, 1]: one query per
    image, paid through the oracle (its meter counts exactly what the server charged)."""
    try:
        from art.estimators.classification import BlackBoxClassifier
    except ImportError as exc:
        raise ImportError(ART_MISSING) from exc
    if nb_classes < 2:
        raise ValueError(f"nb_classes must be >= 2, got {nb_classes}")
    return BlackBoxClassifier(
        lambda x: one_hot_labels(oracle, x, nb_classes=nb_classes),
        tuple(input_shape),
        nb_classes,
        clip_values=(0.0, 1.0),
    )


def art_substitute(
    arch: str = "lenet5",
    *,
    input_shape: tuple[int, int, int] = (1, 28, 28),
    nb_classes: int = 10,
    lr: float = 1e-3,
    seed: int = 0,
) -> PyTorchClassifier:
    """A fresh ``arch`` (our architectures, Adam ``lr``, cross-entropy) as ART's thieved
    classifier, so ART's attacks train the same substitute ours do."""
    try:
        from art.estimators.classification import PyTorchClassifier
    except ImportError as exc:
        raise ImportError(ART_MISSING) from exc
    torch.manual_seed(seed)
    model = build_model(arch, in_channels=input_shape[0], num_classes=nb_classes)
    return PyTorchClassifier(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=lr),
        input_shape=tuple(input_shape),
        nb_classes=nb_classes,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
