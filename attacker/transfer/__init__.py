"""Transfer attacks: adversarial examples crafted on the substitute and sent to the target.

The attacks themselves (PGD, IGSM, C&W L2) are ``mlcore.adversarial``'s, shared with the defender.

- ``attacks``: the attack a step crafts with, checked against the options given.
- ``evaluation``: seeds, crafting, sending what fools the substitute (or, as the paper, every
  example), the noise baseline.
- ``report``: ``transfer.json``, ``transfer.md``, ``confusion.png``, ``success_vs_queries.png``.
"""

from __future__ import annotations

from attacker.transfer.attacks import ATTACKS, default_eps, make_attack, parse_eps
from attacker.transfer.evaluation import (
    Crafted,
    TransferResult,
    choose_seeds,
    craft,
    noise_like,
    perturbation_norms,
    quantize,
    random_seeds,
    transfer_attack,
)
from attacker.transfer.report import attach_to_run_report, write_transfer_report

__all__ = [
    "ATTACKS",
    "Crafted",
    "TransferResult",
    "attach_to_run_report",
    "choose_seeds",
    "craft",
    "default_eps",
    "make_attack",
    "noise_like",
    "parse_eps",
    "perturbation_norms",
    "quantize",
    "random_seeds",
    "transfer_attack",
    "write_transfer_report",
]
