"""One round of a membership challenge over HTTP: read the candidates, check the attack fits the
model's output policy and the budget (before buying anything), run it, submit the scores once,
and write ``membership.json`` and ``roc.png``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from attacker.membership.attacks import SHADOW_ATTACKS, make_attack
from attacker.membership.base import check_affordable
from attacker.oracle import HttpOracle, OracleError
from mlcore.client import ServiceClient
from mlcore.wire import EncodedTensor, decode_tensor


def policy_decimals(policy: str) -> int | None:
    """The decimals of a ``probabilities:D`` policy (None for any other)."""
    kind, _, decimals = policy.partition(":")
    return int(decimals) if kind == "probabilities" and decimals.isdigit() else None


def play_challenge(
    url: str,
    api_key: str,
    challenge_id: str,
    attack_name: str,
    params: dict[str, Any],
    report_dir: Path,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Play challenge ``challenge_id`` with the attack ``attack_name`` (``params`` as for
    ``make_attack``; shadow attacks round their shadows' posteriors as the target's policy
    does unless ``decimals`` is given); returns the report written to ``report_dir``."""
    make_attack(attack_name, **params)  # a bad name or parameter fails before any request
    with ServiceClient(url, api_key) as service:
        challenge = service.membership_challenge(challenge_id)
        if challenge["submitted"]:
            raise OracleError(f"challenge {challenge_id} was already scored: one submission each")
        images = decode_tensor(EncodedTensor.model_validate(challenge["images"]))
        labels = np.asarray(challenge["labels"], dtype=np.int64)
        with HttpOracle(url, api_key, challenge["model"], on_batch=on_batch) as oracle:
            policy = oracle.output_policy()
            if isinstance(make_attack(attack_name, **params), SHADOW_ATTACKS):
                params = {"decimals": policy_decimals(policy), **params}
            attack = make_attack(attack_name, **params)
            needed = check_affordable(
                attack,
                len(images),
                output_policy=policy,
                queries_remaining=challenge["queries_remaining"],
            )
            scores = attack.scores(oracle, images, labels)
            result = service.submit_membership_scores(challenge_id, scores.tolist())
            report = {
                "challenge_id": challenge_id,
                "model": challenge["model"],
                "output_policy": policy,
                "attack": attack.name,
                "parameters": attack.parameters(),
                "candidates": len(images),
                **{key: result[key] for key in FIGURES},
                "queries_needed": needed,
                **oracle.meter.report(),
                "roc": result["roc"],
            }
    write_membership_report(report_dir, report)
    return report


FIGURES = ("auc", "balanced_accuracy", "tpr_at_1pct_fpr", "tpr_at_01pct_fpr")


def write_membership_report(report_dir: Path, report: dict[str, Any]) -> Path:
    """``membership.json`` and ``roc.png`` (the ROC curve the service published) in ``report_dir``."""
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / "membership.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(report["roc"]["fpr"], report["roc"]["tpr"], marker=".", label=report["attack"])
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{report['model']}: AUC {report['auc']:.3f}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(report_dir / "roc.png", dpi=120)
    plt.close(fig)
    return path
