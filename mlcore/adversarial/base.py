"""The shape every attack here shares, after foolbox: validated keyword-only parameters, and a
public final ``__call__`` that validates its inputs, runs the attack with the model in eval mode
and then enforces the threat model itself (``_constrain``: projection and/or clipping to
[0, 1]), so no bug in a step rule can return an example outside it.

    adversarial = attack(model, x, target=wanted)      # targeted: make the model say ``wanted``
    adversarial = attack(model, x, labels=true_labels)  # untargeted: move away from ``labels``
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, final

import torch
from torch import nn

__all__ = ["Attack", "check_bool", "check_int", "check_positive", "check_seed"]

MODES = ("targeted", "untargeted")


def check_positive(name: str, value: object) -> float:
    """A finite number > 0 (not a bool), as float; else ValueError naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def check_int(name: str, value: object, *, minimum: int) -> int:
    """An integer >= ``minimum`` (not a bool); else ValueError naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_seed(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"seed must be an integer, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


class Attack(ABC):
    """Base of the gradient attacks; subclasses give ``name``, ``norm`` (the norm their
    perturbations are measured in), ``modes``, ``params``, ``_run`` and ``_constrain``."""

    name: ClassVar[str]
    modes: ClassVar[tuple[str, ...]] = MODES
    norm: str
    seed: int = 0

    @property
    @abstractmethod
    def params(self) -> dict[str, object]:
        """Constructor parameters, JSON-ready, so ``type(attack)(**params)`` repeats the attack."""

    def describe(self) -> str:
        """A short human title, e.g. 'PGD linf eps 0.5'."""
        return self.name

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.params.items())
        return f"{type(self).__name__}({args})"

    def check_mode(self, targeted: bool) -> None:
        """ValueError if this attack does not run in that mode."""
        mode = "targeted" if targeted else "untargeted"
        if mode not in self.modes:
            raise ValueError(f"{self.name} runs {' or '.join(self.modes)} only, not {mode}")

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
        the shape of ``x``, lies in [0, 1] and meets the attack's own constraint.
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
        self.check_mode(targeted=target is not None)
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
        return self._constrain(x, adversarial.detach())

    @abstractmethod
    def _run(
        self, model: nn.Module, x: torch.Tensor, classes: torch.Tensor, *, targeted: bool
    ) -> torch.Tensor:
        """The attack itself; called with validated inputs and the model in eval mode."""

    @abstractmethod
    def _constrain(self, x: torch.Tensor, adversarial: torch.Tensor) -> torch.Tensor:
        """Force ``adversarial`` into the threat model around ``x`` (always within [0, 1])."""
