"""Training jobs: what a client may ask for (recipes, the request), and the job state machine.

A job's life, and the only transitions the state store performs::

    queued ──claim──> running ──> succeeded | failed
      │                 │  └──(lease expired: another worker claims it, attempts + 1)──┐
      │                 └──(worker stopped: released)──> queued <───────────────────────┘
      └──────────────────────> cancelled <── running   (DELETE by the owner or the admin)

``succeeded``, ``failed`` and ``cancelled`` are final. Every transition is a conditional UPDATE in
``state.py`` whose WHERE clause names the source statuses allowed here, and a running job's
updates also name the worker's claim token, so a worker that lost its lease cannot write.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from defenses.base import check_setting_names, make_detector
from defenses.output_policies import parse_policy
from mlcore.architectures import ARCHITECTURES

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]

TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled"}),
    "running": frozenset({"running", "queued", "succeeded", "failed", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}
FINAL = frozenset(status for status, targets in TRANSITIONS.items() if not targets)


def sources(target: str) -> tuple[str, ...]:
    """The statuses a job may move to ``target`` from (for the store's WHERE clauses)."""
    return tuple(status for status, targets in TRANSITIONS.items() if target in targets)


MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class _Strict(BaseModel):
    """Strict: ``"epochs": "3"`` or ``true`` is refused, not read as a number."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Recipe(_Strict):
    """How a model is trained: Adam with cross-entropy, as the operator's targets are."""

    epochs: int = Field(ge=1, le=200)
    batch_size: int = Field(default=64, ge=1, le=4096)
    learning_rate: float = Field(default=1e-3, gt=0, le=1)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    validation_split: float = Field(
        default=0.0, ge=0, lt=1, description="Share of the data held out to report accuracy on."
    )


RECIPES: dict[str, Recipe] = {
    "fastest": Recipe(epochs=3, batch_size=32),
    "standard": Recipe(epochs=15, batch_size=32),
}


class TrainingJobRequest(_Strict):
    dataset_id: str = Field(min_length=1, max_length=64)
    arch: str = Field(description=f"One of {sorted(ARCHITECTURES)}.")
    recipe: Annotated[str, Field(description=f"One of {sorted(RECIPES)}.")] | Recipe
    name: str = Field(description="The hosted name becomes u/<client-name>/<name>.")
    publish: Literal["private", "public"] = "private"
    output_policy: str = "label-only"
    detectors: dict[str, dict[str, Any]] | None = Field(
        default=None,
        description="Detector settings as TARGET_DETECTORS has them; default PRADA and MI.",
    )
    alarm_policy: Literal["log", "block"] = "log"
    test_dataset_id: str | None = Field(
        default=None, max_length=64, description="Another of your datasets to report accuracy on."
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if value not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {value[:100]!r}")
        return value

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, value: str | Recipe) -> str | Recipe:
        if isinstance(value, str) and value not in RECIPES:
            raise ValueError(
                f"recipe must be one of {sorted(RECIPES)} or an object, got {value[:100]!r}"
            )
        return value

    @field_validator("name")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if not MODEL_NAME.match(value):
            raise ValueError(
                "name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
                f"digit, got {value[:100]!r}"
            )
        return value

    @field_validator("output_policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        parse_policy(value)
        return value

    @field_validator("detectors")
    @classmethod
    def _detectors(cls, value: dict[str, dict[str, Any]] | None) -> dict | None:
        for name, settings in (value or {}).items():
            if "reference" in settings:
                raise ValueError("the MI reference is measured on your data, not given")
            if name == "mi_redundancy":  # built once its reference is measured, after training
                check_setting_names(name, settings)
            else:
                make_detector(name, **settings)
        return value

    def resolved_recipe(self) -> Recipe:
        return RECIPES[self.recipe] if isinstance(self.recipe, str) else self.recipe


def hosted_name(client_name: str, name: str) -> str:
    return f"u/{client_name}/{name}"


def train_size(n: int, recipe: Recipe) -> int:
    """Images a job trains on: the dataset minus the validation share."""
    return n - int(n * recipe.validation_split)
