"""The paper's Tables 1-2 for one parent: per sanitisation threshold, how many training images
are left (with the parent's and the sanitised model's epochs beside it, since the set depends on
how long the judging model trained) and the sanitised model's clean test accuracy; for the
canonical method also the canonical model's accuracy on its own 20% and on the test split.
The benchmark calls this once per seed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from defenses.sanitization.canonical import CanonicalModel, train_canonical_model
from defenses.sanitization.errors import SanitizationError
from defenses.sanitization.heldout import held_out_split
from defenses.sanitization.pair import METHODS, build_sanitized_pair
from defenses.sanitization.selection import confident_subset
from mlcore.checkpoints import load_checkpoint
from mlcore.datasets import load_dataset

PAPER_THRESHOLDS = {
    "canonical": (0.7, 0.8, 0.9, 0.99, 0.999, 0.9999),
    "self": (0.999, 0.9999, 0.99999, 0.999999, 0.9999999),
}


def sanitization_table(
    parent_path: Path,
    *,
    method: str,
    out_dir: Path,
    thresholds: Sequence[float] | None = None,
    data_root: Path | None = None,
    fonts_dirs: Iterable[Path] = (),
    system_fonts: bool = True,
    epochs: int | None = None,
    canonical_epochs: int | None = None,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """One row per threshold (default: the paper's for ``method``), and the canonical model's
    report (None for ``self``). A threshold that leaves too few images gets its set size, no
    accuracy, and the reason. Each sanitised model is saved in ``out_dir``."""
    if method not in METHODS:
        raise SanitizationError(f"method must be one of {list(METHODS)}, got {method!r}")
    parent = load_checkpoint(parent_path)
    train = load_dataset(parent.dataset, data_root=data_root)
    canonical: CanonicalModel | None = None
    if method == "canonical":
        canonical = train_canonical_model(
            arch=parent.arch,
            arch_kwargs=parent.arch_kwargs,
            test=held_out_split(parent.dataset, data_root=data_root).test,
            fonts_dirs=fonts_dirs,
            system_fonts=system_fonts,
            epochs=canonical_epochs or epochs or parent.metrics.get("epochs") or 10,
            seed=seed,
        )
    judge = canonical.model if canonical is not None else parent.model
    rows = []
    for threshold in thresholds or PAPER_THRESHOLDS[method]:
        row: dict[str, Any] = {
            "method": method,
            "threshold": threshold,
            "kept": len(confident_subset(judge, train, threshold)),
            "train_size": len(train),
            "parent_epochs": parent.metrics.get("epochs"),
            "sanitized_epochs": None,
            "clean_accuracy": None,
            "note": "",
        }
        try:
            pair = build_sanitized_pair(
                parent_path,
                method=method,
                threshold=threshold,
                data_root=data_root,
                epochs=epochs,
                seed=seed,
                canonical=canonical,
                out_path=Path(out_dir)
                / f"{Path(parent_path).stem}.sanitized-{method}-{threshold}.pt",
            )
        except SanitizationError as exc:
            row["note"] = str(exc)
        else:
            row["sanitized_epochs"] = pair.provenance["sanitized_epochs"]
            row["clean_accuracy"] = pair.metrics["test_accuracy"]
        rows.append(row)
    return rows, canonical.report if canonical is not None else None
