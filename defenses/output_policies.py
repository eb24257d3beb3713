"""Output policies: how much of a model's belief an answer reveals.

Each policy turns a batch of logits into one response schema from ``mlcore.wire``; because the
schema is the contract, a label-only answer has no field that could leak scores. Policies are
named in settings as ``label-only``, ``top-k:K`` or ``probabilities:DECIMALS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from mlcore.wire import LabelsResponse, ProbabilitiesResponse, TopKResponse


class OutputPolicy(Protocol):
    @property
    def name(self) -> str: ...

    def render(self, logits: torch.Tensor) -> dict:
        """Fields of the response for a batch of logits (usage fields are added by the service)."""
        ...

    @property
    def response_model(self) -> type: ...


@dataclass(frozen=True)
class LabelOnly:
    name: str = "label-only"
    response_model = LabelsResponse

    def render(self, logits: torch.Tensor) -> dict:
        return {"labels": logits.argmax(dim=1).tolist()}


@dataclass(frozen=True)
class TopK:
    k: int
    response_model = TopKResponse

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"top-k needs k >= 1, got {self.k}")

    @property
    def name(self) -> str:
        return f"top-k:{self.k}"

    def render(self, logits: torch.Tensor) -> dict:
        top = logits.topk(min(self.k, logits.shape[1]), dim=1).indices
        return {"labels": top[:, 0].tolist(), "top_k": top.tolist()}


@dataclass(frozen=True)
class RoundedProbabilities:
    decimals: int
    response_model = ProbabilitiesResponse

    def __post_init__(self) -> None:
        if not 0 <= self.decimals <= 6:
            raise ValueError(f"probabilities:DECIMALS needs 0..6 decimals, got {self.decimals}")

    @property
    def name(self) -> str:
        return f"probabilities:{self.decimals}"

    def render(self, logits: torch.Tensor) -> dict:
        probabilities = torch.softmax(logits.double(), dim=1)
        rounded = torch.round(probabilities, decimals=self.decimals)
        return {"labels": logits.argmax(dim=1).tolist(), "probabilities": rounded.tolist()}


def parse_policy(spec: str) -> OutputPolicy:
    """'label-only' | 'top-k:3' | 'probabilities:2' -> policy object."""
    kind, _, arg = spec.partition(":")
    try:
        if kind == "label-only" and not arg:
            return LabelOnly()
        if kind == "top-k":
            return TopK(int(arg))
        if kind == "probabilities":
            return RoundedProbabilities(int(arg or 2))
    except ValueError as exc:
        if "needs" in str(exc):
            raise
    raise ValueError(
        f"output policy must be 'label-only', 'top-k:K' or 'probabilities:DECIMALS', got {spec!r}"
    )
