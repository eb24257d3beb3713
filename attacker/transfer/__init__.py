"""Transfer attacks: PGD adversarial examples crafted on the substitute and sent to the target.

- ``pgd``: our own PGD (L-inf / L2, targeted / untargeted) with validated parameters.
- ``evaluation``: seeds, crafting, sending what fools the substitute (or, as the paper, every
  example), the noise baseline.
- ``report``: ``transfer.json``, ``transfer.md``, ``confusion.png``, ``success_vs_queries.png``.
"""

from __future__ import annotations

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
from attacker.transfer.pgd import NORMS, PGD, project
from attacker.transfer.report import attach_to_run_report, write_transfer_report

__all__ = [
    "NORMS",
    "PGD",
    "Crafted",
    "TransferResult",
    "attach_to_run_report",
    "choose_seeds",
    "craft",
    "default_eps",
    "noise_like",
    "parse_eps",
    "perturbation_norms",
    "project",
    "quantize",
    "random_seeds",
    "transfer_attack",
    "write_transfer_report",
]

# The paper's eps: targeted 0.5 (Table 8; its text also names 128/255), untargeted 0.3 (Table 9).
DEFAULT_EPS = {True: 0.5, False: 0.3}


def default_eps(targeted: bool) -> float:
    """The paper's eps: 0.5 for targeted examples, 0.3 for untargeted ones."""
    return DEFAULT_EPS[bool(targeted)]


def parse_eps(text: str) -> float:
    """'0.5', '128/255' -> float; errors name the value."""
    from fractions import Fraction

    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"eps must be a number or a fraction like 128/255, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"eps must be > 0, got {text}")
    return value
