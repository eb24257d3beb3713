"""Projected gradient descent (Madry et al. 2018) under the L-infinity or L2 norm, on inputs in
[0, 1], targeted or untargeted.

Our own short implementation rather than foolbox (which the DRMI paper used): foolbox 3 has been
unmaintained since 2024 and pins eagerpy, and PGD is thirty lines of torch. The shape follows
foolbox's ``FixedEpsilonAttack`` (``mlcore.adversarial.base.Attack``): the final ``__call__``
validates its inputs, runs the attack and then enforces the constraints itself (projection onto
the eps-ball and clipping to [0, 1] after every step and once more at the end), so no bug in a
step rule can return an example outside the threat model.

    attack = PGD(norm="linf", eps=0.5)
    adversarial = attack(model, x, target=wanted)      # targeted: make the model say ``wanted``
    adversarial = attack(model, x, labels=true_labels)  # untargeted: move away from ``labels``

Subclasses change what is climbed by overriding ``_objective`` (the adaptive attacker adds a
divergence penalty) or the start and step (IGSM).

Defaults follow Madry et al.: 40 steps of size 2.5 * eps / steps, random start inside the ball;
every step runs (as foolbox 3 does), so examples end deep inside the wanted class. With
``early_stop=True`` an example stops moving as soon as the model gives the wanted answer (foolbox
2's ``return_early``): smaller perturbations, sitting just across the substitute's boundary.
"""

from __future__ import annotations

from typing import ClassVar, Final

import torch
from torch import nn
from torch.nn import functional as F

from mlcore.adversarial.base import Attack, check_bool, check_int, check_positive, check_seed

__all__ = ["NORMS", "PGD", "project"]

NORMS: Final = ("linf", "l2")
_TINY = 1e-12


def _per_example_l2(delta: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example, shaped (n, 1, 1, ...) to broadcast against ``delta``."""
    norms = delta.flatten(1).norm(p=2, dim=1)
    return norms.view(-1, *([1] * (delta.dim() - 1)))


def project(x: torch.Tensor, adversarial: torch.Tensor, *, norm: str, eps: float) -> torch.Tensor:
    """Project ``adversarial`` onto the eps-ball around ``x``, then clip to [0, 1].

    Clipping after the projection never leaves the ball: ``x`` lies in [0, 1], so clipping only
    shrinks each coordinate of the perturbation towards zero.
    """
    delta = adversarial - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    elif norm == "l2":
        delta = delta * (eps / _per_example_l2(delta).clamp_min(_TINY)).clamp(max=1.0)
    else:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return (x + delta).clamp(0.0, 1.0)


class PGD(Attack):
    """Projected gradient descent; see the module docstring.

    ``norm``: "linf" or "l2"; ``eps``: radius of the ball (> 0, in [0, 1] pixel units);
    ``steps``: iterations (>= 1); ``step_size``: per-step move (default 2.5 * eps / steps);
    ``random_start``: start from a uniform point of the ball; ``early_stop``: freeze an example
    once the model gives the wanted answer; ``seed``: seeds the random start.
    """

    name: ClassVar[str] = "PGD"

    def __init__(
        self,
        *,
        norm: str = "linf",
        eps: float,
        steps: int = 40,
        step_size: float | None = None,
        random_start: bool = True,
        early_stop: bool = False,
        seed: int = 0,
    ) -> None:
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        eps = check_positive("eps", eps)
        steps = check_int("steps", steps, minimum=1)
        step_size = check_positive(
            "step_size", 2.5 * eps / steps if step_size is None else step_size
        )
        check_bool("random_start", random_start)
        check_bool("early_stop", early_stop)
        check_seed(seed)
        self.norm, self.eps, self.steps = norm, eps, steps
        self.step_size, self.random_start, self.seed = step_size, random_start, seed
        self.early_stop = early_stop

    @property
    def params(self) -> dict[str, object]:
        """Constructor parameters, JSON-ready, so ``PGD(**params)`` repeats the attack."""
        return {
            "norm": self.norm,
            "eps": self.eps,
            "steps": self.steps,
            "step_size": self.step_size,
            "random_start": self.random_start,
            "early_stop": self.early_stop,
            "seed": self.seed,
        }

    def describe(self) -> str:
        return f"{self.name} {self.norm} eps {self.eps:.4g}"

    def _constrain(self, x: torch.Tensor, adversarial: torch.Tensor) -> torch.Tensor:
        return project(x, adversarial, norm=self.norm, eps=self.eps)

    def _objective(
        self, model: nn.Module, adversarial: torch.Tensor, classes: torch.Tensor, *, targeted: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, the scalar each step climbs): the cross-entropy of ``classes``, negated when
        targeted. Summed, not averaged: each example's gradient is independent of the batch."""
        logits = model(adversarial)
        loss = F.cross_entropy(logits, classes, reduction="sum")
        return logits, -loss if targeted else loss

    def _run(
        self, model: nn.Module, x: torch.Tensor, classes: torch.Tensor, *, targeted: bool
    ) -> torch.Tensor:
        """The PGD iterations; called with validated inputs and the model in eval mode."""
        adversarial = self._start(x)
        for _ in range(self.steps):
            adversarial.requires_grad_(True)
            logits, objective = self._objective(model, adversarial, classes, targeted=targeted)
            (gradient,) = torch.autograd.grad(objective, adversarial)
            if self.early_stop:
                predicted = logits.detach().argmax(dim=1)
                done = predicted == classes if targeted else predicted != classes
                if done.all():
                    break
                gradient[done] = 0.0  # a zero move: projection leaves the example where it is
            with torch.no_grad():
                if self.norm == "linf":
                    move = gradient.sign()
                else:
                    move = gradient / _per_example_l2(gradient).clamp_min(_TINY)
                adversarial = project(
                    x, adversarial + self.step_size * move, norm=self.norm, eps=self.eps
                )
        return adversarial

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        if not self.random_start:
            return x.clone()
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        if self.norm == "linf":
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            delta = (2 * noise - 1) * self.eps
        else:  # uniform in the L2 ball: Gaussian direction, radius eps * u^(1/d)
            direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            direction = direction / _per_example_l2(direction).clamp_min(_TINY)
            dims = x[0].numel()
            u = torch.rand(len(x), generator=generator, device=x.device, dtype=x.dtype)
            radius = self.eps * u.pow(1.0 / dims)
            delta = direction * radius.view(-1, *([1] * (x.dim() - 1)))
        return project(x, x + delta, norm=self.norm, eps=self.eps)
