"""``target-service``: train the hosted targets, and serve them."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from target_service.settings import Settings

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
    calibration_clients: Annotated[
        int,
        typer.Option(
            min=0, help="Benign clients per population to calibrate the detectors (0: skip)."
        ),
    ] = 100,
    condense: Annotated[
        str | None,
        typer.Option(help="Train on a condensed version of the training split: dm or dc."),
    ] = None,
    ipc: Annotated[int, typer.Option(help="Condensed images per class (with --condense).")] = 10,
    init: Annotated[str, typer.Option(help="noise or real (with --condense).")] = "noise",
    members: Annotated[
        int | None,
        typer.Option(min=1, help="Train on a seeded random subset of this many images."),
    ] = None,
) -> None:
    """Train the default targets into checkpoints, print their test accuracy, calibrate
    their detectors (TARGET_DETECTORS) as `calibrate` does, and build the sanitised twin of each
    model with an input defence (TARGET_INPUT_DEFENSES). With --condense or --members the
    models are trained on a condensed set or a subset and named <model>-dm10-noise,
    <model>-subset100, ...; the checkpoint records the real images used (its members)."""
    from target_service.member_sets import derived_name
    from target_service.screening import build_pair
    from target_service.settings import DEFAULT_MODELS, Settings
    from target_service.zoo import calibrate_target, target_spec, train_target

    names = models or DEFAULT_MODELS
    if condense is not None and members is not None:
        raise typer.BadParameter("--condense and --members exclude each other")
    if condense is not None:
        from defenses.condensation import CondensationConfig, CondensationError

        try:
            CondensationConfig(method=condense, ipc=ipc, init=init).check()  # type: ignore[arg-type]
        except CondensationError as exc:
            raise typer.BadParameter(str(exc)) from None
    names = [
        derived_name(name, method=condense, ipc=ipc, init=init, member_count=members)
        for name in names
    ]
    _check_models(names)
    settings = Settings()
    configured = settings.detectors
    table = Table(
        "model", "test data", "test accuracy", "epochs", "seconds", "checkpoint", "thresholds"
    )
    for name in names:
        with console.status(f"training {name}..."):
            try:
                path = train_target(
                    target_spec(name), checkpoint_dir, data_root=data_root, epochs=epochs
                )
            except ValueError as exc:  # e.g. more images per class than a class has
                raise typer.BadParameter(str(exc)) from None
        thresholds = "not calibrated"
        if calibration_clients and configured.get(name) != {}:  # {}: detection is off
            with console.status(f"calibrating the detectors of {name}..."):
                calibration = calibrate_target(
                    target_spec(name),
                    checkpoint_dir,
                    configured.get(name),
                    data_root=data_root,
                    clients=calibration_clients,
                )
            thresholds = ", ".join(
                f"{detector} {setting} {value:.4f}"
                for detector, settings in calibration.settings().items()
                for setting, value in settings.items()
            )
        from mlcore.checkpoints import load_checkpoint

        metrics = load_checkpoint(path).metrics
        table.add_row(
            name,
            metrics["test_data"],
            f"{metrics['test_accuracy']:.2%}",
            str(metrics["epochs"]),
            str(metrics["train_seconds"]),
            str(path),
            thresholds,
        )
        spec = settings.input_defenses.get(name)
        if spec is not None:
            with console.status(f"building the sanitised twin of {name}..."):
                pair = build_pair(name, checkpoint_dir, spec, data_root=data_root)
            console.print(
                f"{name}: sanitised twin ({spec.method}, threshold {spec.threshold:g}) built; "
                f"{spec.score} threshold {pair.score_threshold:.6g} lets {spec.pass_rate:.0%} "
                "of held-out normal images through"
            )
    console.print(table)


@app.command()
def calibrate(
    models: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Model(s) to calibrate (default: TARGET_MODELS)."),
    ] = None,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="Overrides TARGET_CHECKPOINT_DIR.")
    ] = None,
    data_root: Annotated[Path | None, typer.Option(help="Root of full datasets.")] = None,
    share: Annotated[
        float, typer.Option(help="Most benign clients flagged within the horizon, in (0, 1).")
    ] = 0.01,
    horizon: Annotated[int, typer.Option(help="Queries per benign client.")] = 1000,
    clients: Annotated[int, typer.Option(help="Simulated benign clients per population.")] = 200,
    seed: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """Set each hosted model's detector thresholds so that at most SHARE of benign clients
    (with and without near-duplicates) is flagged within HORIZON queries; stored beside the
    checkpoint as <model>.calibration.json and used by `serve`."""
    import torch

    from defenses.base import DetectorError
    from defenses.calibration import check_parameters, threshold_for
    from target_service.settings import Settings
    from target_service.zoo import calibrate_target, calibration_path, target_spec

    settings = Settings()
    names = models or settings.models
    _check_models(names)
    checkpoint_dir = checkpoint_dir or settings.checkpoint_dir
    data_root = data_root or settings.data_root
    try:  # bad parameters fail before any model is loaded
        check_parameters(share, horizon, clients)
    except DetectorError as exc:
        raise typer.BadParameter(str(exc)) from None
    torch.set_num_threads(settings.torch_threads)
    table = Table("model", "detector", "threshold", "per population", "file")
    for name in names:
        detectors = settings.detectors.get(name)
        if detectors == {}:
            console.print(f"{name}: detection is off (TARGET_DETECTORS), nothing to calibrate")
            continue
        with console.status(f"calibrating {name}...") as status:

            def progress(population: str, done: int, name: str = name) -> None:
                status.update(f"calibrating {name}: {population}, client {done}/{clients}")

            try:
                calibration = calibrate_target(
                    target_spec(name), checkpoint_dir, detectors, data_root=data_root, share=share,
                    horizon=horizon, clients=clients, seed=seed, progress=progress,
                )  # fmt: skip
            except (FileNotFoundError, DetectorError) as exc:
                raise typer.BadParameter(str(exc)) from None
        for detector, entry in calibration.detectors.items():
            table.add_row(
                name, detector, f"{entry['setting']} = {calibration.threshold(detector):.4f}",
                ", ".join(
                    f"{p.name}: {threshold_for(entry['extremes'][p.name], share):.4f}"
                    for p in calibration.populations
                ),
                str(calibration_path(checkpoint_dir, name)),
            )  # fmt: skip
    console.print(table)


def _check_models(names: list[str]) -> None:
    from target_service.zoo import target_spec

    for name in names:
        try:
            target_spec(name)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None


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
    check_state_database(settings)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)


def check_state_database(settings: Settings) -> None:
    """Open the state database once (applying its migrations) before any model loads: a
    database that does not answer exits with code 1, naming it (without its password)."""
    from target_service.errors import StateUnavailable
    from target_service.state import open_store

    try:
        open_store(settings).close()
    except StateUnavailable as exc:
        typer.echo(f"cannot start: {exc}", err=True)
        raise typer.Exit(1) from None


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
