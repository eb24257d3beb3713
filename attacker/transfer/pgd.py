"""Projected gradient descent (Madry et al. 2018) under the L-infinity or L2 norm, on inputs in
[0, 1], targeted or untargeted.

Our own short implementation rather than foolbox (which the DRMI paper used): foolbox 3 has been
unmaintained since 2024 and pins eagerpy, and PGD is thirty lines of torch. The shape follows
foolbox's ``FixedEpsilonAttack``: validated keyword-only parameters, and a public final
``__call__`` that validates its inputs, runs the attack and then enforces the constraints itself
(projection onto the eps-ball and clipping to [0, 1] after every step and once more at the end),
so no bug in a step rule can return an example outside the threat model.

    attack = PGD(norm="linf", eps=0.5)
    adversarial = attack(model, x, target=wanted)      # targeted: make the model say ``wanted``
    adversarial = attack(model, x, labels=true_labels)  # untargeted: move away from ``labels``

Defaults follow Madry et al.: 40 steps of size 2.5 * eps / steps, random start inside the ball;
every step runs (as foolbox 3 does), so examples end deep inside the wanted class. With
``early_stop=True`` an example stops moving as soon as the model gives the wanted answer (foolbox
2's ``return_early``): smaller perturbations, sitting just across the substitute's boundary.
"""

from __future__ import annotations

import math
from typing import Final, final

import torch
from torch import nn
from torch.nn import functional as F

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


class PGD:
    """Projected gradient descent; see the module docstring.

    ``norm``: "linf" or "l2"; ``eps``: radius of the ball (> 0, in [0, 1] pixel units);
    ``steps``: iterations (>= 1); ``step_size``: per-step move (default 2.5 * eps / steps);
    ``random_start``: start from a uniform point of the ball; ``early_stop``: freeze an example
    once the model gives the wanted answer; ``seed``: seeds the random start.
    """

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
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if step_size is None:
            step_size = 2.5 * eps / steps
        if (
            isinstance(step_size, bool)
            or not isinstance(step_size, int | float)
            or not math.isfinite(step_size)
            or step_size <= 0
        ):
            raise ValueError(f"step_size must be a finite number > 0, got {step_size!r}")
        if not isinstance(random_start, bool):
            raise ValueError(f"random_start must be True or False, got {random_start!r}")
        if not isinstance(early_stop, bool):
            raise ValueError(f"early_stop must be True or False, got {early_stop!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.norm, self.eps, self.steps = norm, float(eps), steps
        self.step_size, self.random_start, self.seed = float(step_size), random_start, seed
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

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.params.items())
        return f"PGD({args})"

    @final
    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Adversarial examples for the float images ``x`` (n, ...) in [0, 1].

        Exactly one of ``target`` (targeted: reach these classes) or ``labels`` (untargeted: leave
        these classes) must be given, one integer class per image. The result is detached, has
        the shape of ``x``, lies in [0, 1] and within ``eps`` of ``x`` in the attack's norm.
        """
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(
                f"x must be a float tensor in [0, 1], got {type(x).__name__}"
                + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else "")
            )
        if x.dim() < 2 or len(x) < 1:
            raise ValueError(f"x must have shape (n, ...) with n >= 1, got {tuple(x.shape)}")
        if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise ValueError(
                f"x must be finite and in [0, 1], got values in [{x.min().item()}, {x.max().item()}]"
            )
        if (target is None) == (labels is None):
            raise ValueError("give exactly one of target= (targeted) or labels= (untargeted)")
        classes = target if target is not None else labels
        name = "target" if target is not None else "labels"
        classes = torch.as_tensor(classes)
        if classes.dtype.is_floating_point or classes.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer classes, got dtype {classes.dtype}")
        if classes.shape != (len(x),):
            raise ValueError(
                f"{name} must have shape ({len(x)},) to match x, got {tuple(classes.shape)}"
            )
        classes = classes.long().to(x.device)
        x = x.detach()
        was_training = model.training
        model.eval()  # before the first forward pass: no dropout, no batch-norm statistics update
        try:
            with torch.no_grad():
                num_classes = model(x[:1]).shape[1]
            if classes.min() < 0 or classes.max() >= num_classes:
                raise ValueError(
                    f"{name} must be classes in 0..{num_classes - 1}, got values in "
                    f"[{classes.min().item()}, {classes.max().item()}]"
                )
            adversarial = self._run(model, x, classes, targeted=target is not None)
        finally:
            model.train(was_training)
        return project(x, adversarial.detach(), norm=self.norm, eps=self.eps)

    def _run(
        self, model: nn.Module, x: torch.Tensor, classes: torch.Tensor, *, targeted: bool
    ) -> torch.Tensor:
        """The PGD iterations; called with validated inputs and the model in eval mode."""
        adversarial = self._start(x)
        for _ in range(self.steps):
            adversarial.requires_grad_(True)
            logits = model(adversarial)
            # Summed (not mean) loss: each example's gradient is independent of the batch size.
            loss = F.cross_entropy(logits, classes, reduction="sum")
            (gradient,) = torch.autograd.grad(loss, adversarial)
            if targeted:
                gradient = -gradient  # descend the loss of the wanted class
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
