"""``target-service``: train the hosted targets, and serve them."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="The mlaas-range target service.", no_args_is_help=True)
console = Console()


@app.command()
def train(
    models: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="Model(s) to train.")
    ] = None,
    checkpoint_dir: Annotated[Path, typer.Option(help="Where checkpoints go.")] = Path(
        "checkpoints"
    ),
    data_root: Annotated[Path | None, typer.Option(help="Root of full datasets.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Override the epochs.")] = None,
) -> None:
    """Train the default targets into checkpoints and print their test accuracy."""
    from target_service.settings import DEFAULT_MODELS
    from target_service.zoo import TARGETS, train_target

    names = models or DEFAULT_MODELS
    unknown = [name for name in names if name not in TARGETS]
    if unknown:
        raise typer.BadParameter(f"unknown model(s) {unknown}; known: {sorted(TARGETS)}")
    table = Table("model", "test data", "test accuracy", "epochs", "seconds", "checkpoint")
    for name in names:
        with console.status(f"training {name}..."):
            path = train_target(TARGETS[name], checkpoint_dir, data_root=data_root, epochs=epochs)
        from mlcore.checkpoints import load_checkpoint

        metrics = load_checkpoint(path).metrics
        table.add_row(
            name,
            metrics["test_data"],
            f"{metrics['test_accuracy']:.2%}",
            str(metrics["epochs"]),
            str(metrics["train_seconds"]),
            str(path),
        )
    console.print(table)


@app.command()
def serve(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    state_dir: Annotated[Path | None, typer.Option(help="Overrides TARGET_STATE_DIR.")] = None,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="Overrides TARGET_CHECKPOINT_DIR.")
    ] = None,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Serve the hosted models (settings from TARGET_* environment variables).

    Bad settings exit with code 2 before any model loads; a detector value or reference that
    does not fit its detector stops the start-up (uvicorn's exit code 3), naming it."""
    import uvicorn
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from target_service.app import create_app
    from target_service.settings import Settings, describe_settings_error

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.umask(0o077)  # state, WAL and detector snapshots hold client data: owner-only files
    try:
        settings = Settings()
    except ValidationError as exc:
        typer.echo(f"invalid settings:\n{describe_settings_error(exc)}", err=True)
        raise typer.Exit(2) from None
    except SettingsError as exc:  # e.g. a variable that is not valid JSON
        typer.echo(f"invalid settings: {exc}", err=True)
        raise typer.Exit(2) from None
    if state_dir is not None:
        settings.state_dir = state_dir
    if checkpoint_dir is not None:
        settings.checkpoint_dir = checkpoint_dir
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)


@app.command("train-worker")
def train_worker(
    state_dir: Annotated[Path | None, typer.Option(help="Overrides TARGET_STATE_DIR.")] = None,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Run queued training jobs from the state database (``serve`` starts these itself)."""
    from target_service.settings import Settings
    from target_service.worker import run_worker

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings()
    if state_dir is not None:
        settings.state_dir = state_dir
    run_worker(settings)


if __name__ == "__main__":
    app()
