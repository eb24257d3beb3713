"""Gradient attacks both sides use: the attacker's transfer attacks, the defender's evaluation.

- ``pgd``: PGD (Madry et al.), L-inf or L2, targeted or untargeted.
- ``igsm``: IGSM (Kurakin et al.), untargeted iterative FGSM, as "Less is More" uses it.
- ``cw``: Carlini-Wagner L2, confidence kappa, binary search over c, Adam in tanh space.
- ``evasive``: PGD that keeps KL(model || twin) low (the adaptive attacker of seed 001).

Each is an ``Attack`` (``base``): ``attack(model, x, target=...)`` or ``labels=...``; the final
``__call__`` validates the inputs and enforces the threat model (the eps-ball, [0, 1]).
"""

from __future__ import annotations

from mlcore.adversarial.base import Attack
from mlcore.adversarial.cw import CarliniWagnerL2
from mlcore.adversarial.evasive import TwinEvasivePGD
from mlcore.adversarial.igsm import IGSM
from mlcore.adversarial.pgd import NORMS, PGD, project

__all__ = ["IGSM", "NORMS", "PGD", "Attack", "CarliniWagnerL2", "TwinEvasivePGD", "project"]
