"""``defender condense`` and ``defender condense-eval``: the command bodies (registered in
``defenses/cli.py``). Heavy imports happen inside, so ``defender --help`` stays quick."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

DataRoot = Annotated[Path | None, typer.Option(help="Root of full datasets (mnist:...).")]


def condense_command(
    method: Annotated[str, typer.Option(help="dm (distribution matching) or dc (gradients).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The condensed set (.npz).")],
    images: Annotated[
        str, typer.Option(help="The real images to condense (dataset spec).")
    ] = "mnist-embedded:target-train",
    ipc: Annotated[int, typer.Option(help="Synthetic images per class (1, 10, 50...).")] = 10,
    init: Annotated[str, typer.Option(help="noise or real.")] = "noise",
    iterations: Annotated[
        int | None, typer.Option(help="Iterations (default: the method's, see README).")
    ] = None,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    batch_real: Annotated[
        int | None, typer.Option(help="Real images per class per matching step.")
    ] = None,
    pool_per_class: Annotated[
        int | None,
        typer.Option(help="Condense from a seeded sample of this many images per class."),
    ] = None,
    state: Annotated[
        Path | None,
        typer.Option(help="Resumable state file (default: OUTPUT.state.pt; removed when done)."),
    ] = None,
    grid: Annotated[Path | None, typer.Option(help="PNG grid (default: OUTPUT.png).")] = None,
    evaluate: Annotated[
        bool, typer.Option(help="Then train fresh ConvNet and LeNet-5 on it (condense-eval).")
    ] = False,
    test: Annotated[str, typer.Option(help="Test split for --evaluate.")] = "mnist-embedded:test",
    data_root: DataRoot = None,
) -> None:
    """Condense a labelled image set into IPC synthetic images per class (DC or DM), with a
    progress bar; an interrupted run resumes from its state file. Writes an npz that
    `defender upload` and the training API accept, and a PNG grid (one row per class)."""
    from defenses.condensation import (
        CondensationConfig,
        CondensationError,
        condense,
        save_grid,
        save_npz,
    )
    from mlcore.datasets import DatasetError, load_dataset

    config = CondensationConfig(
        method=method,  # type: ignore[arg-type]  # checked by condense()
        ipc=ipc,
        init=init,  # type: ignore[arg-type]
        iterations=iterations,
        seed=seed,
        batch_real=batch_real,
        pool_per_class=pool_per_class,
    )
    state_path = state or output.with_name(output.name + ".state.pt")
    try:
        config.check()
        dataset = load_dataset(images, data_root=data_root)
        columns = (
            TextColumn(f"{method} ipc {ipc}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=err_console) as progress:
            task = progress.add_task("condense", total=None, loss="-")

            def update(done: int, total: int, loss: float) -> None:
                progress.update(task, completed=done, total=total, loss=f"{loss:.4f}")

            condensed = condense(dataset, config, state_path=state_path, progress=update)
    except (CondensationError, DatasetError) as exc:
        raise typer.BadParameter(str(exc)) from None
    save_npz(output, condensed.images, condensed.labels, condensed.provenance())
    grid_path = save_grid(grid or output.with_suffix(".png"), condensed.images, ipc)
    state_path.unlink(missing_ok=True)
    summary = {
        "output": str(output),
        "grid": str(grid_path),
        "images": len(condensed.labels),
        "members": len(condensed.members),
        "source": condensed.source,
        "settings": condensed.config.to_json(),
        "first_loss": condensed.losses[0] if condensed.losses else None,
        "last_loss": condensed.losses[-1] if condensed.losses else None,
        "seconds": condensed.seconds,
    }
    err_console.print_json(json.dumps(summary))
    console.print(str(output))
    if evaluate:
        evaluate_command(output, test=test, baseline=images, data_root=data_root)


def evaluate_command(
    dataset: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="A condensed set (.npz).")
    ],
    test: Annotated[str, typer.Option(help="Test split.")] = "mnist-embedded:test",
    baseline: Annotated[
        str | None,
        typer.Option(
            help="Also train on random real subsets of this split, same size ('' to skip)."
        ),
    ] = "mnist-embedded:target-train",
    seeds: Annotated[int, typer.Option(min=1, help="Models per architecture.")] = 1,
    epochs: Annotated[int | None, typer.Option(min=1, help="Training epochs (full batch).")] = None,
    data_root: DataRoot = None,
) -> None:
    """Train fresh ConvNet and LeNet-5 models on a condensed set and print their test accuracy,
    beside random real subsets of the same size and the papers' figures."""
    from defenses.condensation import CondensationError, load_npz
    from defenses.condensation.evaluation import (
        ANCHORS,
        EVALUATION_EPOCHS,
        POSTER,
        evaluate_training_set,
        random_real_baseline,
    )
    from mlcore.datasets import DatasetError, load_dataset

    try:
        images, labels = load_npz(dataset)
        test_set = load_dataset(test, data_root=data_root)
        train_set = load_dataset(baseline, data_root=data_root) if baseline else None
    except (CondensationError, DatasetError) as exc:
        raise typer.BadParameter(str(exc)) from None
    ipc = len(labels) // test_set.num_classes
    method = _method_of(dataset)
    seed_list, epochs = tuple(range(seeds)), epochs or EVALUATION_EPOCHS
    name = f"{method or 'condensed'} ipc {ipc}"
    with console.status("training fresh models on the condensed set..."):
        rows = evaluate_training_set(
            images, labels, test_set, training_set=name, seeds=seed_list, epochs=epochs
        )
    if train_set is not None:
        with console.status("training fresh models on random real subsets..."):
            rows += random_real_baseline(train_set, ipc, test_set, seeds=seed_list, epochs=epochs)
    table = Table("training set", "model", f"{test} accuracy", "paper (ConvNet, MNIST)", "poster")
    for row in rows:
        anchors = ANCHORS.get("random" if row.training_set.startswith("random") else method or "")
        paper = anchors.get(ipc) if anchors else None
        poster = POSTER["subset" if row.training_set.startswith("random") else "condensed"]
        table.add_row(
            row.training_set,
            row.arch,
            f"{100 * row.mean:.2f}%" + (f" ± {100 * row.spread:.2f}" if seeds > 1 else ""),
            f"{paper}%" if paper is not None else "-",
            f"~{poster:.0f}% (10 ipc)",
        )
    console.print(table)


def _method_of(path: Path) -> str | None:
    """The condensation method recorded in a condensed npz's provenance, if any."""
    import numpy as np

    with np.load(path, allow_pickle=False) as npz:
        if "provenance" not in npz.files:
            return None
        provenance = json.loads(str(npz["provenance"]))
    return provenance.get("condensed", {}).get("method")
