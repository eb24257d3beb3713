"""PGD that also keeps the divergence between two models low: the adaptive attacker's crafting
step against the KL detector of "Less is More" (seed 001; the paper's own future work).

The detector rejects an input when KL(p_unsanitised || p_sanitised) is high. An attacker who
knows this builds its own pair, its substitute and a sanitised twin of it, and climbs
``PGD objective - kl_weight * KL(p_model || p_twin)``: the example still reaches the wanted class
on its substitute, while both of its models agree about it, as they do on normal images.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from mlcore.adversarial.base import check_positive
from mlcore.adversarial.pgd import PGD

__all__ = ["TwinEvasivePGD"]


class TwinEvasivePGD(PGD):
    """``TwinEvasivePGD(twin=sanitised, kl_weight=1.0, eps=0.5)(substitute, x, target=t)``.

    Every PGD parameter applies. ``twin`` is not in ``params`` (a model is not JSON): the
    caller records how it was built.
    """

    name: ClassVar[str] = "PGD+KL"

    def __init__(self, *, twin: nn.Module, kl_weight: float = 1.0, **pgd: Any) -> None:
        super().__init__(**pgd)
        if not isinstance(twin, nn.Module):
            raise ValueError(f"twin must be a torch model, got {type(twin).__name__}")
        self.twin = twin
        self.kl_weight = check_positive("kl_weight", kl_weight)

    @property
    def params(self) -> dict[str, object]:
        return {**super().params, "kl_weight": self.kl_weight}

    def describe(self) -> str:
        return f"{super().describe()}, KL weight {self.kl_weight:g}"

    def _objective(
        self, model: nn.Module, adversarial: torch.Tensor, classes: torch.Tensor, *, targeted: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, objective = super()._objective(model, adversarial, classes, targeted=targeted)
        self.twin.eval()
        # F.kl_div(input, target) = sum exp(target) * (target - input): KL(model || twin).
        divergence = F.kl_div(
            F.log_softmax(self.twin(adversarial), dim=1),
            F.log_softmax(logits, dim=1),
            log_target=True,
            reduction="sum",
        )
        return logits, objective - self.kl_weight * divergence
