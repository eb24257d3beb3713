"""``defender protect``: the command body (registered in ``defenses/cli.py``). A data owner adds
unlearnable noise to images before publishing them; heavy imports happen inside, so
``defender --help`` stays quick."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    import torch

    from defenses.unlearnable import ProtectionResult

console = Console()
err_console = Console(stderr=True)


def parse_eps(text: str) -> float:
    """'32/255' or '0.125' -> a float in (0, 1]; the error names the value."""
    from defenses.unlearnable import check_eps

    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise typer.BadParameter(
            f"--eps must be a number or a fraction like 32/255, got {text!r}"
        ) from None
    try:
        return check_eps(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{exc} (from {text!r})") from None


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a value is read as JSON when it parses (numbers, null, true), else
    kept as a string."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--option must look like KEY=VALUE, got {pair!r}")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = value
    return options


def protect_command(
    method: Annotated[str, typer.Option(help="One of `defender protect --list`'s methods.")] = "",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="The protected set (.npz).")
    ] = None,
    images: Annotated[
        str, typer.Option(help="The images to protect: a dataset spec or npz:PATH.")
    ] = "mnist-embedded:pool",
    eps: Annotated[str, typer.Option(help="L-inf budget: a number or a fraction a/b.")] = "32/255",
    seed: Annotated[int, typer.Option(min=0)] = 0,
    surrogate: Annotated[
        str | None, typer.Option(help="The method's surrogate (an architecture or a checkpoint).")
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(help="A method option KEY=VALUE (repeatable), e.g. max_rounds=40."),
    ] = None,
    no_labels: Annotated[
        bool, typer.Option(help="Ignore the images' labels (a scraped pool has none).")
    ] = False,
    state: Annotated[
        Path | None,
        typer.Option(help="Resumable state file (default: OUTPUT.state.pt; removed when done)."),
    ] = None,
    figure: Annotated[Path | None, typer.Option(help="PNG (default: OUTPUT.png).")] = None,
    per_class: Annotated[int, typer.Option(min=1, help="Images per class in the PNG.")] = 2,
    evaluate: Annotated[
        bool, typer.Option(help="Then train fresh models on clean and protected images.")
    ] = False,
    test: Annotated[str, typer.Option(help="Clean test split for --evaluate.")] = (
        "mnist-embedded:test"
    ),
    eval_arch: Annotated[str, typer.Option(help="Architecture for --evaluate.")] = "lenet5",
    eval_epochs: Annotated[int, typer.Option(min=1)] = 10,
    eval_seeds: Annotated[int, typer.Option(min=1, help="Models per training set.")] = 1,
    list_methods: Annotated[
        bool, typer.Option("--list", help="List the methods and exit.")
    ] = False,
    data_root: Annotated[Path | None, typer.Option(help="Root of full datasets.")] = None,
) -> None:
    """Add unlearnable noise (L-inf, eps) to images, with a progress bar; an interrupted run
    resumes from its state file. Writes an npz (`images` float32 in [0, 1], `labels`, `noise`,
    `info`) that `defender upload` and `npz:PATH` pools accept, and a PNG of clean / noise /
    protected rows."""
    from defenses.unlearnable import METHODS

    if list_methods:
        for name, fn in METHODS.items():
            summary = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())
            console.print(f"{name}: {summary}")
        return
    if method not in METHODS:
        raise typer.BadParameter(f"--method must be one of {list(METHODS)}, got {method!r}")
    if output is None:
        raise typer.BadParameter("--output is required")
    budget = parse_eps(eps)
    options = parse_options(option or [])
    if surrogate is not None:
        options["surrogate"] = surrogate
    clean, labels = _load_images(images, no_labels=no_labels, data_root=data_root)
    state_path = state or output.with_name(output.name + ".state.pt")
    result = _run(method, clean, labels, budget, seed, state_path, options)
    result.info["source"] = images
    from defenses.unlearnable.files import save_figure, save_protected

    save_protected(output, result)
    png = save_figure(figure or output.with_suffix(".png"), clean, result, per_class=per_class)
    state_path.unlink(missing_ok=True)
    noise = result.noise.abs()
    summary = {
        "output": str(output),
        "figure": str(png),
        "images": len(result.images),
        "max_abs_noise": float(noise.max()),
        "mean_abs_noise": float(noise.mean()),
        **{key: value for key, value in result.info.items() if key != "history"},
    }
    err_console.print_json(json.dumps(summary, default=str))
    console.print(str(output))
    if evaluate:
        if result.labels is None:
            raise typer.BadParameter("--evaluate needs labelled images")
        _evaluate(
            clean, result.images, result.labels, test, eval_arch, eval_epochs, eval_seeds, data_root
        )


def _load_images(
    spec: str, *, no_labels: bool, data_root: Path | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float images in [0, 1] and labels (None with --no-labels or an npz without labels)."""
    from mlcore.datasets import NPZ, DatasetError, load_dataset, read_npz

    try:
        if spec.startswith(NPZ + ":"):
            images, labels = read_npz(spec[len(NPZ) + 1 :], need_labels=False)
        else:
            dataset = load_dataset(spec, data_root=data_root)
            images, labels = dataset.images, dataset.labels
    except DatasetError as exc:
        raise typer.BadParameter(str(exc)) from None
    return images.float().div(255), None if no_labels else labels


def _run(
    method: str,
    clean: torch.Tensor,
    labels: torch.Tensor | None,
    eps: float,
    seed: int,
    state_path: Path,
    options: dict[str, Any],
) -> ProtectionResult:
    from defenses.unlearnable import METHODS

    columns = (
        TextColumn(f"{method} eps {eps:.4g}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console) as progress:
        task = progress.add_task("protect", total=None, detail="")

        def update(done: int, total: int, detail: str) -> None:
            progress.update(task, completed=done, total=total, detail=detail)

        try:
            return METHODS[method](
                clean,
                labels,
                eps=eps,
                seed=seed,
                progress=update,
                resume_path=state_path,
                **options,
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None


def _evaluate(
    clean: torch.Tensor,
    protected: torch.Tensor,
    labels: torch.Tensor,
    test: str,
    arch: str,
    epochs: int,
    seeds: int,
    data_root: Path | None,
) -> None:
    """Clean-test accuracy of fresh models trained on the clean and on the protected images."""
    from defenses.unlearnable.evaluation import compare_clean_and_protected
    from mlcore.datasets import DatasetError, load_dataset

    try:
        test_set = load_dataset(test, data_root=data_root)
    except DatasetError as exc:
        raise typer.BadParameter(str(exc)) from None
    with console.status(f"training {arch} on clean and on protected images..."):
        rows = compare_clean_and_protected(
            clean,
            protected,
            labels,
            test_set.as_float(),
            test_set.labels,
            arch=arch,
            epochs=epochs,
            seeds=tuple(range(seeds)),
            num_classes=test_set.num_classes,
        )
    table = Table("trained on", "model", "seed", f"{test} accuracy")
    for row in rows:
        table.add_row(row.training_set, row.arch, str(row.seed), f"{100 * row.test_accuracy:.2f}%")
    console.print(table)
