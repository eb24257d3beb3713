"""Carlini and Wagner's L2 attack (IEEE S&P 2017), as "Less is More" (seed 001) runs it:
targeted, with confidence ``kappa``, a binary search over the constant c, Adam in tanh space.

Each example minimises ``||x' - x||_2^2 + c * max(kappa - margin(x'), 0)`` over ``w``, with
``x' = (tanh(w) + 1) / 2`` (so x' always lies in [0, 1]) and ``margin`` the logit of the wanted
class minus the largest other logit (targeted), or the largest other logit minus the true
class's (untargeted). An example succeeds when its margin exceeds ``kappa``. After each run of
``steps`` Adam steps, c is bisected per example: a success lowers the upper bound (smaller
perturbations next), a failure raises the lower bound (multiplied by 10 while no upper bound is
known). The result is the smallest successful example found; an example that never succeeded is
returned unchanged (x itself), so callers judge success on the model, as for every attack here.

Defaults are the authors' (and foolbox's), except ``steps``: 1,000 instead of 10,000, with their
early abort (stop a run when the loss has not fallen by 0.01% over a tenth of the steps).
With fewer steps raise ``learning_rate``: a pixel at 0 or 1 starts at w = atanh(-+0.999999),
about -+7.25, where tanh is flat, and Adam moves w by about ``learning_rate`` per step, so 100
steps at 0.01 cannot lift MNIST's black background (on a LeNet-5, 4 x 100 steps from c = 1
reach the wanted class for 3 of 30 images at 0.01 and for 30 of 30 at 0.1).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from mlcore.adversarial.base import Attack, check_bool, check_int, check_positive

__all__ = ["CarliniWagnerL2"]

_TANH_LIMIT = 1 - 1e-6  # atanh(+-1) is infinite: pull the images a hair inside [0, 1]


class CarliniWagnerL2(Attack):
    """``CarliniWagnerL2(kappa=0.5)(model, x, target=wanted)``; see the module docstring.

    ``kappa``: required logit margin (>= 0); ``binary_search_steps``: rounds of the search over c
    (>= 1); ``steps``: Adam steps per round; ``learning_rate``: Adam's; ``initial_const``: the
    first c; ``abort_early``: stop a round when the loss stalls.
    """

    name: ClassVar[str] = "CW-L2"
    norm = "l2"

    def __init__(
        self,
        *,
        kappa: float = 0.0,
        binary_search_steps: int = 9,
        steps: int = 1000,
        learning_rate: float = 0.01,
        initial_const: float = 1e-3,
        abort_early: bool = True,
    ) -> None:
        if isinstance(kappa, bool) or not isinstance(kappa, int | float) or not kappa >= 0:
            raise ValueError(f"kappa must be a number >= 0, got {kappa!r}")
        if not math.isfinite(kappa):
            raise ValueError(f"kappa must be finite, got {kappa!r}")
        self.kappa = float(kappa)
        self.binary_search_steps = check_int("binary_search_steps", binary_search_steps, minimum=1)
        self.steps = check_int("steps", steps, minimum=1)
        self.learning_rate = check_positive("learning_rate", learning_rate)
        self.initial_const = check_positive("initial_const", initial_const)
        self.abort_early = check_bool("abort_early", abort_early)

    @property
    def params(self) -> dict[str, object]:
        return {
            "kappa": self.kappa,
            "binary_search_steps": self.binary_search_steps,
            "steps": self.steps,
            "learning_rate": self.learning_rate,
            "initial_const": self.initial_const,
            "abort_early": self.abort_early,
        }

    def describe(self) -> str:
        return f"C&W L2 kappa {self.kappa:g}"

    def _constrain(self, x: torch.Tensor, adversarial: torch.Tensor) -> torch.Tensor:
        return adversarial.clamp(0.0, 1.0)

    @staticmethod
    def margin(logits: torch.Tensor, classes: torch.Tensor, *, targeted: bool) -> torch.Tensor:
        """Per example: wanted logit minus the best other (targeted), or the best logit other
        than the true class's minus it (untargeted). Success: margin > kappa."""
        own = logits.gather(1, classes[:, None])[:, 0]
        others = logits.scatter(1, classes[:, None], -math.inf).amax(dim=1)
        return own - others if targeted else others - own

    def _run(
        self, model: nn.Module, x: torch.Tensor, classes: torch.Tensor, *, targeted: bool
    ) -> torch.Tensor:
        n = len(x)
        w_start = torch.atanh((2 * x - 1) * _TANH_LIMIT)
        lower = torch.zeros(n, dtype=x.dtype, device=x.device)
        upper = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
        const = torch.full((n,), self.initial_const, dtype=x.dtype, device=x.device)
        best = x.clone()
        best_squared = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
        check_every = max(self.steps // 10, 1)
        for _ in range(self.binary_search_steps):
            w = w_start.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([w], lr=self.learning_rate)
            succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
            previous = math.inf
            for step in range(self.steps):
                adversarial = (torch.tanh(w) + 1) / 2
                margin = self.margin(model(adversarial), classes, targeted=targeted)
                squared = (adversarial - x).flatten(1).pow(2).sum(dim=1)
                # Summed over the batch: Adam works per coordinate, so examples stay independent.
                loss = (squared + const * (self.kappa - margin).clamp_min(0.0)).sum()
                (w.grad,) = torch.autograd.grad(loss, w)
                optimizer.step()
                with torch.no_grad():  # judge the point the loss was computed at
                    won = margin.detach() > self.kappa
                    better = won & (squared.detach() < best_squared)
                    best_squared = torch.where(better, squared.detach(), best_squared)
                    best[better] = adversarial.detach()[better]
                    succeeded |= won
                if self.abort_early and step > 0 and step % check_every == 0:
                    if loss.item() > previous * 0.9999:
                        break
                    previous = loss.item()
            upper = torch.where(succeeded, torch.minimum(upper, const), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, const))
            const = torch.where(torch.isfinite(upper), (lower + upper) / 2, const * 10)
        return best
