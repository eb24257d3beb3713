"""IGSM, the iterative gradient sign method (Kurakin, Goodfellow and Bengio 2017, "basic iterative
method"), untargeted, as "Less is More" (seed 001) runs it: from the image itself (no random
start), ``steps`` L-inf sign steps of ``step_size`` up the loss of the true label, each clipped
to the eps-ball and to [0, 1]. The paper reports 5, 10 and 15 iterations.

It is PGD without the random start, so it is PGD's code with those settings fixed. The paper
does not give eps or the step; the defaults are cleverhans' ``BasicIterativeMethod`` ones for
MNIST, the library of its time: eps 0.3, step 0.05 (so the ball is reached after 6 steps, and
more steps push further inside it).
"""

from __future__ import annotations

from typing import ClassVar

from mlcore.adversarial.pgd import PGD

__all__ = ["IGSM"]


class IGSM(PGD):
    """Untargeted iterative FGSM: ``IGSM(steps=5)(model, x, labels=y)``."""

    name: ClassVar[str] = "IGSM"
    modes: ClassVar[tuple[str, ...]] = ("untargeted",)

    def __init__(self, *, eps: float = 0.3, steps: int = 10, step_size: float = 0.05) -> None:
        super().__init__(norm="linf", eps=eps, steps=steps, step_size=step_size, random_start=False)

    @property
    def params(self) -> dict[str, object]:
        return {"eps": self.eps, "steps": self.steps, "step_size": self.step_size}

    def describe(self) -> str:
        return f"IGSM-{self.steps} eps {self.eps:.4g}"
