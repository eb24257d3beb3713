"""``defender sanitize``: build a sanitised twin of a checkpoint and its detector threshold.

Registered on the ``defender`` app in ``defenses/cli.py``; the heavy imports (torch, fonts)
happen when the command runs, so ``defender --help`` stays quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

PAPER_MODEL_THRESHOLDS = {"self": 0.9999999, "canonical": 0.9999}  # the paper's Section 4 models

console = Console()
err_console = Console(stderr=True)


def sanitize(
    checkpoint: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, help="The parent (unsanitised) model.")
    ],
    method: Annotated[
        str, typer.Option(help="self (the parent judges its own data) or canonical (fonts).")
    ] = "self",
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Keep training images with confidence >= this on their label, in (0, 1) "
            "(default: the paper's, 0.9999999 for self, 0.9999 for canonical)."
        ),
    ] = None,
    pass_rate: Annotated[
        float, typer.Option(help="Share of held-out normal images the detector lets through.")
    ] = 0.98,
    score: Annotated[str, typer.Option(help="Detector score: kl, js or disagree.")] = "kl",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Where to save it (default: beside the parent, <stem>.sanitized-<method>.pt)."
        ),
    ] = None,
    data_root: Annotated[
        Path | None, typer.Option(help="Folder with full datasets, if the parent used one.")
    ] = None,
    fonts_dir: Annotated[
        list[Path] | None,
        typer.Option(help="Extra folder of .ttf/.otf fonts for canonical (repeatable)."),
    ] = None,
    system_fonts: Annotated[
        bool, typer.Option(help="Also render the machine's fonts (canonical).")
    ] = True,
    epochs: Annotated[
        int | None,
        typer.Option(min=1, help="Epochs of the sanitised model (default: the parent's)."),
    ] = None,
    canonical_epochs: Annotated[
        int | None,
        typer.Option(min=1, help="Epochs of the canonical model (default: as --epochs)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of every model trained here.")] = 0,
) -> None:
    """Sanitise the parent's training data, train the sanitised twin, set the detector threshold
    on held-out normal images, and save the self-describing checkpoint."""
    from defenses.sanitization import (
        SanitizationError,
        build_sanitized_pair,
        sanitized_checkpoint_path,
    )

    chosen = threshold if threshold is not None else PAPER_MODEL_THRESHOLDS.get(method, 0.0)
    out_path = out or sanitized_checkpoint_path(checkpoint, method)
    with err_console.status(f"{method} sanitisation of {checkpoint.name} at {chosen}"):
        try:
            pair = build_sanitized_pair(
                checkpoint,
                method=method,
                threshold=chosen,
                pass_rate=pass_rate,
                score=score,
                data_root=data_root,
                fonts_dirs=fonts_dir or [],
                system_fonts=system_fonts,
                epochs=epochs,
                canonical_epochs=canonical_epochs,
                seed=seed,
                out_path=out_path,
            )
        except SanitizationError as exc:
            err_console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(code=1) from None
    provenance, metrics = pair.provenance, pair.metrics
    table = Table("figure", "value", title=f"sanitised model {out_path}")
    rows = [
        ("method, threshold", f"{pair.method}, {pair.threshold}"),
        (
            "training images kept",
            f"{provenance['kept_count']} of {provenance['train_size']} ({provenance['train_data']})",
        ),
        (
            "epochs (parent, sanitised)",
            f"{provenance['parent_epochs']}, {provenance['sanitized_epochs']}",
        ),
        (
            "test accuracy (parent, sanitised)",
            f"{metrics['parent_test_accuracy']:.2%}, {metrics['test_accuracy']:.2%} ({metrics['test_data']})",
        ),
        (
            f"{pair.score_kind} threshold at {pair.pass_rate:.0%} pass",
            f"{pair.score_threshold:.6g}",
        ),
        ("normal pass rate (calibration half)", f"{provenance['calibration_pass_rate']:.2%}"),
    ]
    if "canonical" in provenance:
        report = provenance["canonical"]
        rows.append(
            (
                "canonical model",
                f"{report['font_count']} fonts, {report['images']} images, {report['epochs']} epochs: "
                f"{report['held_out_accuracy']:.2%} on its 20%, {report['test_accuracy']:.2%} on {report['test_data']}",
            )
        )
    for row in rows:
        table.add_row(*row)
    err_console.print(table)
    console.print(str(out_path))
