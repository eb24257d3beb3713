"""``target-service``: train the hosted targets, and serve them."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

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
    workers: Annotated[
        int,
        typer.Option(
            min=1, max=64, help="Processes serving the port (uvicorn workers) on one database."
        ),
    ] = 1,
) -> None:
    """Serve the hosted models (settings from TARGET_* environment variables).

    Bad settings exit with code 2 before any model loads; a detector value or reference that
    does not fit its detector stops the start-up (uvicorn's exit code 3), naming it. With
    --workers N the processes share the state database, so what lives in one process's memory
    must not matter: it needs TARGET_DETECTION_MODE=worker (and `target-service detect`) when a
    model is watched, and no input defence; each process has its own rate limiter."""
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
    if workers == 1:
        uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)
        return
    from target_service.cluster import prepare_shared_start

    try:
        prepare_shared_start(settings)
    except ValueError as exc:
        typer.echo(f"--workers {workers}: {exc}", err=True)
        raise typer.Exit(2) from None
    # each worker process builds its own app from the environment, overrides included
    os.environ["TARGET_STATE_DIR"] = str(settings.state_dir)
    os.environ["TARGET_CHECKPOINT_DIR"] = str(settings.checkpoint_dir)
    uvicorn.run(
        "target_service.app:create_app",
        factory=True,
        workers=workers,
        host=host,
        port=port,
        log_level=log_level,
    )


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


@app.command()
def detect(
    state_dir: Annotated[Path | None, typer.Option(help="Overrides TARGET_STATE_DIR.")] = None,
    database_url: Annotated[
        str | None, typer.Option(help="Overrides TARGET_DATABASE_URL (PostgreSQL).")
    ] = None,
    poll: Annotated[
        float, typer.Option(min=0.01, help="Seconds to wait when no stream has new queries.")
    ] = 0.2,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Run the detectors off the request path (TARGET_DETECTION_MODE=worker): consume the query
    log per stream, write alarms; stops cleanly on SIGTERM. Start one or several."""
    from target_service.detect_worker import run_detection_worker

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.umask(0o077)
    settings = _settings(state_dir, database_url)
    try:
        run_detection_worker(settings, poll=poll)
    except FileNotFoundError as exc:  # a checkpoint the service has not trained yet
        typer.echo(f"cannot start the detection worker: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command("create-client")
def create_client(
    name: Annotated[str, typer.Option(help="The client's name (printable text).")],
    budget: Annotated[int, typer.Option(min=0, max=10**12, help="Queries it may buy.")],
    org: Annotated[
        str | None, typer.Option(help="Its organisation (cross-client detection groups).")
    ] = None,
    training_quota: Annotated[
        int, typer.Option(min=0, max=10**15, help="Image-epochs of training.")
    ] = 0,
    state_dir: Annotated[Path | None, typer.Option(help="Overrides TARGET_STATE_DIR.")] = None,
    database_url: Annotated[
        str | None, typer.Option(help="Overrides TARGET_DATABASE_URL (PostgreSQL).")
    ] = None,
) -> None:
    """Create a client in the state database and print its id and API key (shown once)."""
    import re

    from target_service.state import ORG_PATTERN, open_store

    if not name or not name.isprintable():
        raise typer.BadParameter("--name must be printable text without control characters")
    if org is not None and not re.match(ORG_PATTERN, org):
        raise typer.BadParameter(
            f"--org must be 1-64 letters, digits, '_', '.' or '-' (starting with a letter or "
            f"digit), got {org[:100]!r}"
        )
    settings = _settings(state_dir, database_url)
    store = open_store(settings)
    try:
        client, api_key = store.create_client(name, budget, training_quota=training_quota, org=org)
    finally:
        store.close()
    typer.echo(f"client_id {client.client_id}\napi_key {api_key}")


@app.command()
def cluster(
    replicas: Annotated[int, typer.Option(min=1, max=64, help="Service replicas.")] = 2,
    port: Annotated[int, typer.Option(help="The first replica's port; the next ones follow.")] = (
        8000
    ),
    state_dir: Annotated[
        Path, typer.Option(help="State shared by the replicas: datasets, models, PostgreSQL.")
    ] = Path("var/cluster"),
    database_url: Annotated[
        str | None,
        typer.Option(help="Use this PostgreSQL instead of starting one in STATE_DIR/postgres."),
    ] = None,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="Overrides TARGET_CHECKPOINT_DIR.")
    ] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Start PostgreSQL (unless --database-url), REPLICAS service replicas on ports PORT,
    PORT+1, ... and one detection worker; print where they are; stop them all on Ctrl-C or
    SIGTERM. Settings come from TARGET_* variables (detection runs in the worker)."""
    from pydantic import ValidationError

    from target_service.cluster import Cluster, ClusterError, run_cluster
    from target_service.postgres_server import PostgresUnavailable
    from target_service.settings import describe_settings_error

    os.umask(0o077)
    try:
        cluster = Cluster(
            state_dir, replicas=replicas, port=port, host=host, database_url=database_url,
            checkpoint_dir=checkpoint_dir, log_level=log_level,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        run_cluster(cluster, echo=typer.echo)
    except ValidationError as exc:
        typer.echo(f"invalid settings:\n{describe_settings_error(exc)}", err=True)
        raise typer.Exit(2) from None
    except (ClusterError, PostgresUnavailable, ValueError) as exc:
        typer.echo(f"cannot start the cluster: {exc}", err=True)
        raise typer.Exit(1) from None


def _settings(state_dir: Path | None, database_url: str | None) -> Any:
    """Settings from TARGET_* with the command's overrides; exits 2 naming a bad setting."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from target_service.settings import Settings, describe_settings_error

    if database_url is not None:
        os.environ["TARGET_DATABASE_URL"] = database_url
    try:
        settings = Settings()
    except ValidationError as exc:
        typer.echo(f"invalid settings:\n{describe_settings_error(exc)}", err=True)
        raise typer.Exit(2) from None
    except SettingsError as exc:
        typer.echo(f"invalid settings: {exc}", err=True)
        raise typer.Exit(2) from None
    if os.environ.get("TARGET_DATABASE_URL") and "database_url" not in type(settings).model_fields:
        typer.echo("TARGET_DATABASE_URL: this build has no PostgreSQL backend", err=True)
        raise typer.Exit(2)
    if state_dir is not None:
        settings.state_dir = state_dir
    return settings


if __name__ == "__main__":
    app()
