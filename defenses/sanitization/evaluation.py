"""All detector scores of one sanitised pair on the same curves: for each score kind (kl, js,
disagree), thresholds set on the calibration half of the held-out test split at each normal pass
rate, the false rejects they cause on the evaluation half (unseen normal images), the share of
the given adversarial images they flag, and the ROC AUC of evaluation half against adversarial."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from defenses.sanitization.detector import (
    SCORE_KINDS,
    detection_rate,
    detection_scores,
    roc_auc,
    score_threshold,
)
from defenses.sanitization.heldout import held_out_split
from defenses.sanitization.pair import SanitizedPair
from mlcore.training import predict_logits

PASS_RATES = (0.90, 0.95, 0.98)


def compare_scores(
    pair: SanitizedPair,
    adversarial: torch.Tensor,
    *,
    data_root: Path | None = None,
    pass_rates: tuple[float, ...] = PASS_RATES,
) -> dict[str, dict[str, Any]]:
    """``{kind: {"roc_auc", "thresholds", "false_reject", "detection"}}``, the last three keyed
    by pass rate; ``adversarial`` is a float (n, C, H, W) batch in [0, 1]."""
    held_out = held_out_split(pair.provenance["train_data"], data_root=data_root)
    batches = {
        "calibration": held_out.calibration.images,
        "evaluation": held_out.evaluation.images,
        "adversarial": adversarial,
    }
    logits = {
        name: (predict_logits(pair.parent, x), predict_logits(pair.sanitized, x))
        for name, x in batches.items()
    }
    comparison = {}
    for kind in SCORE_KINDS:
        scores = {
            name: detection_scores(kind, *pair_logits) for name, pair_logits in logits.items()
        }
        thresholds = {
            rate: score_threshold(kind, scores["calibration"], rate) for rate in pass_rates
        }
        comparison[kind] = {
            "roc_auc": roc_auc(scores["evaluation"], scores["adversarial"]),
            "thresholds": thresholds,
            "false_reject": {
                r: detection_rate(scores["evaluation"], t) for r, t in thresholds.items()
            },
            "detection": {
                r: detection_rate(scores["adversarial"], t) for r, t in thresholds.items()
            },
        }
    return comparison
