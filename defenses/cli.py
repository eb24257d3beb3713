"""``defender``: the data owner's command line. Upload a dataset to the service and train a
model on it there (the service hosts it as ``u/<client-name>/<name>``); build a sanitised twin
of a checkpoint (``sanitize``); condense a dataset
(``defenses/condensation``); protect images with unlearnable noise (``protect``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from defenses.condensation_cli import condense_command, evaluate_command
from defenses.sanitization.command import sanitize
from defenses.unlearnable_cli import protect_command
from mlcore.client import ServiceClient, ServiceError

app = typer.Typer(help="The mlaas-range defender and data owner.", no_args_is_help=True)
app.command()(sanitize)
app.command("condense")(condense_command)
app.command("condense-eval")(evaluate_command)
app.command("protect")(protect_command)
console = Console()
err_console = Console(stderr=True)

Url = Annotated[str, typer.Option(help="Base URL of the target service.")]
ApiKey = Annotated[str, typer.Option(envvar="MLAAS_API_KEY", help="Your API key.")]


def _fail(exc: ServiceError) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {exc.message}")
    return typer.Exit(code=1)


@app.command()
def upload(
    url: Url,
    api_key: ApiKey,
    dataset: Annotated[
        Path,
        typer.Option(exists=True, dir_okay=False, help="An npz with 'images' and 'labels'."),
    ],
    name: Annotated[str, typer.Option(help="Your name for the dataset.")],
    classes: Annotated[
        int | None, typer.Option(min=2, help="Number of classes (default: largest label + 1).")
    ] = None,
) -> None:
    """Upload an npz dataset; prints its id (and the service's record as JSON on stderr)."""
    with ServiceClient(url, api_key) as service:
        try:
            record = service.upload_dataset(dataset, name=name, classes=classes)
        except ServiceError as exc:
            raise _fail(exc) from None
    err_console.print_json(json.dumps(record))
    console.print(record["dataset_id"])


@app.command()
def train(
    url: Url,
    api_key: ApiKey,
    dataset_id: Annotated[str, typer.Option(help="The id `defender upload` printed.")],
    arch: Annotated[str, typer.Option(help="lenet5, c3f2, dnn5 or resnet18.")],
    name: Annotated[str, typer.Option(help="The model is hosted as u/<client-name>/<name>.")],
    recipe: Annotated[
        str,
        typer.Option(
            help="fastest, standard, or a JSON object with epochs, batch_size, "
            "learning_rate, seed, validation_split."
        ),
    ] = "fastest",
    publish: Annotated[str, typer.Option(help="private (only you) or public.")] = "private",
    output_policy: Annotated[
        str, typer.Option(help="label-only, top-k:K or probabilities:DECIMALS.")
    ] = "label-only",
    test_dataset_id: Annotated[
        str | None, typer.Option(help="Another of your datasets to report accuracy on.")
    ] = None,
    detach: Annotated[bool, typer.Option(help="Print the job id and return at once.")] = False,
    poll: Annotated[float, typer.Option(min=0.1, help="Seconds between status polls.")] = 1.0,
) -> None:
    """Queue a training job and follow it with a progress bar (or --detach)."""
    recipe_value: Any = recipe
    if recipe.lstrip().startswith("{"):
        try:
            recipe_value = json.loads(recipe)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"--recipe is not valid JSON: {exc}") from None
    with ServiceClient(url, api_key) as service:
        try:
            queued = service.submit_job(
                dataset_id=dataset_id,
                arch=arch,
                recipe=recipe_value,
                name=name,
                publish=publish,
                output_policy=output_policy,
                test_dataset_id=test_dataset_id,
            )
            job_id = queued["job_id"]
            err_console.print(
                f"job {job_id} queued: {queued['image_epochs']} image-epochs, "
                f"model {queued['model']}"
            )
            if detach:
                console.print(job_id)
                return
            job = _follow(service, job_id, poll)
        except ServiceError as exc:
            raise _fail(exc) from None
    if job["status"] != "succeeded":
        err_console.print(f"[red]job {job_id} {job['status']}[/red]: {job.get('error') or ''}")
        raise typer.Exit(code=1)
    err_console.print_json(json.dumps(job["metrics"]))
    console.print(job["model"])


def _follow(service: ServiceClient, job_id: str, poll: float) -> dict[str, Any]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console) as progress:
        task = progress.add_task(job_id, total=None, detail="queued")

        def update(job: dict[str, Any]) -> None:
            detail = f"epoch {job['epoch']}/{job['epochs']}  {job['status']}"
            if job["loss"] is not None:
                detail += f"  loss {job['loss']:.4f}  train acc {job['train_accuracy']:.2%}"
            progress.update(task, total=job["epochs"], completed=job["epoch"], detail=detail)

        return service.wait_for_job(job_id, poll=poll, on_update=update)


if __name__ == "__main__":
    app()
