"""What every query-selection strategy shares: the selector contract, budgets, selection files.

A selector picks which k images of the attacker's labelled pool to spend queries on. The pool's
labels are the attacker's own (DRMI paper, 5.1: selection is carried out under the same label),
so selection runs per class and the budget is split over classes first (``split_budget``).

``Selector.__call__`` is the public entry point and is final: it validates the pool and k,
delegates to ``run`` and checks what ``run`` returned, so a strategy only implements ``run``.
A ``Selection`` is the JSON file ``attacker select`` writes and ``attacker extract`` reads.

Some strategies look at the pool through a model (the DRMI paper's Section 5.4): class
probabilities of the pool images (HCP / LCP, K-means) or activation patterns of the attacker's
own model (TRACE). Such a selector names what it needs in its class attribute ``guide``, and the
caller computes it (``attacker.selection.guides``, or the target's own answers) and passes it as
``guide=``; ``__call__`` checks its shape before ``run`` sees it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, final

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

__all__ = [
    "GUIDE_KINDS",
    "ClassChooser",
    "GuideKind",
    "InvalidSelectionFile",
    "Selection",
    "SelectionResult",
    "Selector",
    "check_int",
    "select_per_class",
    "split_budget",
]


GuideKind = Literal["probabilities", "activations"]
GUIDE_KINDS: tuple[GuideKind, ...] = ("probabilities", "activations")
_GUIDE_DESCRIPTIONS: dict[str, str] = {
    "probabilities": "class probabilities of the pool images, float (n, classes)",
    "activations": "activation patterns of the pool images in the attacker's model, (n, units)",
}


@dataclass(frozen=True)
class SelectionResult:
    """Chosen pool indices (sorted ascending) and what each class contributed.

    ``per_class[c]`` always has ``k`` (images chosen from class c) and ``n`` (its pool size);
    strategies add their own diagnostics (DRMI: ``H``, ``start``, ``swaps``).
    """

    indices: np.ndarray
    per_class: dict[int, dict[str, Any]]


class Selector(ABC):
    """Base class of query-selection strategies; subclasses implement ``run``.

    ``guide`` says what a strategy needs beside the pool: ``"probabilities"`` (class
    probabilities, (n, classes) floats in [0, 1]; rows need not sum to 1, as a rounding output
    policy returns them), ``"activations"`` ((n, units), a unit counts as activated when > 0)
    or None (the pool alone).
    """

    guide: ClassVar[GuideKind | None] = None

    @final
    def __call__(
        self, images: Any, labels: Any, *, k: int, guide: np.ndarray | None = None
    ) -> SelectionResult:
        """Choose ``k`` distinct images of the pool ``images`` (n, ...) with ``labels`` (n,);
        ``guide`` is the array a guided strategy needs (see the class docstring)."""
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim < 2 or len(images) < 1:
            raise ValueError(f"images must have shape (n, ...) with n >= 1, got {images.shape}")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}"
            )
        n = len(images)
        if len(labels) != n:
            raise ValueError(
                f"images and labels must have the same length, got {n} and {len(labels)}"
            )
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
            raise ValueError(f"k must be in 1..{n}, got {k}")
        who = type(self).__name__
        checked_guide = _checked_guide(self.guide, guide, labels=labels, who=who)
        result = self.run(images, labels, k=int(k), guide=checked_guide)
        return _checked(result, n=n, k=int(k), who=who)

    @abstractmethod
    def run(
        self, images: np.ndarray, labels: np.ndarray, *, k: int, guide: np.ndarray | None
    ) -> SelectionResult:
        """Strategy body; called with a validated pool, 1 <= k <= n, and the validated guide
        (float64 probabilities, the activations as given, or None for an unguided strategy)."""

    @property
    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Constructor parameters, JSON-ready, so ``make_selector(method, **params)`` repeats it."""


def _checked_guide(
    kind: GuideKind | None, guide: Any, *, labels: np.ndarray, who: str
) -> np.ndarray | None:
    """The guide a strategy of this ``kind`` may use, validated; errors say what is missing."""
    if kind is None:
        if guide is not None:
            raise ValueError(f"{who} takes no guide, got one of shape {np.shape(guide)}")
        return None
    if guide is None:
        raise ValueError(f"{who} needs a guide: {_GUIDE_DESCRIPTIONS[kind]}; none was given")
    array = np.asarray(guide)
    n = len(labels)
    if array.ndim != 2 or array.shape[0] != n or array.shape[1] < 1:
        raise ValueError(
            f"{who} needs {_GUIDE_DESCRIPTIONS[kind]} with n={n}, got shape {array.shape}"
        )
    if array.dtype != np.bool_ and not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{who}: the {kind} guide must be numeric, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError(f"{who}: the {kind} guide holds NaN or inf")
    if kind == "activations":
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{who}: probabilities must be floats, got dtype {array.dtype}")
    if array.min() < 0.0 or array.max() > 1.0:
        raise ValueError(
            f"{who}: probabilities must lie in [0, 1], got {array.min():.6g}..{array.max():.6g}"
        )
    if labels.min() < 0 or labels.max() >= array.shape[1]:
        raise ValueError(
            f"{who}: the pool's labels span {labels.min()}..{labels.max()} but the guide has "
            f"probabilities for {array.shape[1]} classes"
        )
    return array.astype(np.float64, copy=False)


def _checked(result: SelectionResult, *, n: int, k: int, who: str) -> SelectionResult:
    """Trust no strategy: exactly k distinct in-range indices, returned sorted."""
    indices = np.asarray(result.indices)
    if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
        raise RuntimeError(f"{who} returned indices of shape {indices.shape} dtype {indices.dtype}")
    indices = np.sort(indices.astype(np.int64))
    if len(indices) != k:
        raise RuntimeError(f"{who} returned {len(indices)} indices, expected k={k}")
    if k and (indices[0] < 0 or indices[-1] >= n):
        raise RuntimeError(f"{who} returned indices outside 0..{n - 1}")
    if np.any(indices[1:] == indices[:-1]):
        raise RuntimeError(f"{who} returned repeated indices")
    return SelectionResult(indices=indices, per_class=result.per_class)


def split_budget(class_counts: dict[int, int], k: int, *, proportional: bool) -> dict[int, int]:
    """Split k queries over classes: evenly (DRMI) or in proportion to class size (random).

    Even: k // C each, the remainder one each to classes in ascending order; a class never gets
    more than it holds, and its surplus is spread the same way over classes with room left.
    Proportional: largest-remainder rounding of k * n_c / n (ties to the smaller class label),
    so the sample mirrors the pool's class balance.
    """
    counts = {int(c): _count(c, v) for c, v in class_counts.items()}
    total = sum(counts.values())
    if total < 1:
        raise ValueError(f"class_counts must hold at least one image, got {class_counts}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= total:
        raise ValueError(f"k must be in 1..{total} (the pool size), got {k}")
    classes = sorted(counts)
    if proportional:
        share = {c: k * counts[c] // total for c in classes}
        remainder = {c: k * counts[c] % total for c in classes}
        left = k - sum(share.values())
        for c in sorted(classes, key=lambda c: (-remainder[c], c))[:left]:
            share[c] += 1  # remainder > 0 here, so share[c] < k * n_c / n <= n_c still holds
        return share
    share = dict.fromkeys(classes, 0)
    left = k
    while left:
        open_classes = [c for c in classes if share[c] < counts[c]]
        each, extra = divmod(left, len(open_classes))
        for i, c in enumerate(open_classes):
            give = min(each + (i < extra), counts[c] - share[c])
            share[c] += give
            left -= give
    return share


# choose(c, members, k_c): positions in ``members`` (class c's pool indices) of the k_c images
# chosen, and the strategy's own diagnostics for that class.
ClassChooser = Callable[[int, np.ndarray, int], tuple[np.ndarray, dict[str, Any]]]


def select_per_class(labels: np.ndarray, k: int, choose: ClassChooser) -> SelectionResult:
    """Select the way the DRMI paper runs every strategy (5.1: "carried out under the same
    label ... a simplified dataset for each category, glued together"): k split evenly over the
    pool's classes (``split_budget``), then ``choose`` picks each class's share among its own
    images (called only for classes with a share, 1 <= k_c <= len(members))."""
    classes, counts = np.unique(labels, return_counts=True)
    budget = split_budget(
        {int(c): int(n) for c, n in zip(classes, counts, strict=True)}, k, proportional=False
    )
    chosen: list[np.ndarray] = []
    per_class: dict[int, dict[str, Any]] = {}
    for c, k_c in budget.items():
        members = np.flatnonzero(labels == c)
        per_class[c] = {"k": k_c, "n": len(members)}
        if k_c == 0:
            continue
        positions, diagnostics = choose(c, members, k_c)
        chosen.append(members[positions])
        per_class[c].update(diagnostics)
    return SelectionResult(indices=np.sort(np.concatenate(chosen)), per_class=per_class)


def check_int(name: str, value: object) -> int:
    """``value`` as an int, or a ValueError naming ``name`` (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _count(label: object, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"class {label} must have a non-negative integer count, got {value!r}")
    return int(value)


class InvalidSelectionFile(ValueError):
    """A selection file exists but is not valid JSON of the ``Selection`` schema."""


class Selection(BaseModel):
    """A saved selection: which pool images to query, and how they were chosen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pool: str  # e.g. "mnist-embedded:pool"
    method: str  # the make_selector name, e.g. "drmi"
    params: dict[str, Any]  # make_selector(method, **params) repeats the selection
    k: int
    indices: list[int]  # pool indices, ascending
    per_class: dict[str, dict[str, Any]]  # str keys: JSON objects cannot have int keys
    # Where a guided strategy's guide came from (e.g. {"kind": "probabilities", "source":
    # "model", "checkpoint": ..., "sha256": ...}); None for strategies that use none.
    guide: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Selection:
        if self.k != len(self.indices):
            raise ValueError(f"k is {self.k} but there are {len(self.indices)} indices")
        if any(i < 0 for i in self.indices) or len(set(self.indices)) != len(self.indices):
            raise ValueError("indices must be distinct and non-negative")
        return self

    @classmethod
    def from_result(
        cls,
        result: SelectionResult,
        *,
        pool: str,
        method: str,
        params: dict[str, Any],
        guide: dict[str, Any] | None = None,
    ) -> Selection:
        """Wrap a selector's result with where it came from (and where its guide came from)."""
        return cls(
            pool=pool,
            method=method,
            params=params,
            k=len(result.indices),
            indices=[int(i) for i in result.indices],
            per_class={str(c): _jsonable(info) for c, info in sorted(result.per_class.items())},
            guide=guide,
        )

    def save(self, path: str | Path) -> Path:
        """Write the selection as indented JSON (creating parent folders); return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Selection:
        """Read a selection file; a missing or malformed file raises an error naming it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"selection file {path} does not exist")
        try:
            return cls.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise InvalidSelectionFile(f"{path} is not a valid selection file: {exc}") from exc


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    """numpy scalars to Python ones, so the values survive JSON unchanged."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"per_class value {key}={value} is not finite")
        out[str(key)] = value
    return out
