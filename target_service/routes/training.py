"""Training jobs: ``POST /v1/training-jobs`` (202, queued), status, list, cancel.

Everything a job needs is checked before it is queued, in one transaction that creates
nothing when it refuses: the datasets are the caller's (404), the architecture accepts their
images (422), the hosted name ``u/<client-name>/<name>`` is free (409), and the job's
image-epochs fit the caller's training quota (402). The workers (``worker.py``) do the rest.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from fastapi import APIRouter, status
from pydantic import BaseModel

from mlcore.architectures import check_input_shape
from target_service.deps import ClientDep, ServiceDep
from target_service.errors import BODY_STATUSES, InvalidInput, documented
from target_service.service import TargetService
from target_service.state import Client
from target_service.training_jobs import TrainingJobRequest, hosted_name, train_size

router = APIRouter(prefix="/v1/training-jobs", tags=["training"])

_SUBMIT_ERRORS = documented(*BODY_STATUSES, 401, 402, 404, 409)
_ERRORS = documented(401, 404, 409, 422)


class JobQueued(BaseModel):
    job_id: str
    status: Literal["queued"]
    model: str
    image_epochs: int


class JobView(BaseModel):
    job_id: str
    status: str
    dataset_id: str
    arch: str
    recipe: dict[str, Any]
    publish: str
    epoch: int
    epochs: int
    loss: float | None
    train_accuracy: float | None
    metrics: dict[str, Any] | None
    error: str | None
    model: str | None = None  # the hosted name, once the job succeeded
    image_epochs: int
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None


class AdminJobView(JobView):
    client_id: str
    requested_model: str


def job_view(job: dict[str, Any]) -> JobView:
    request = TrainingJobRequest(**job["spec"]["request"])
    return JobView(
        job_id=job["job_id"],
        status=job["status"],
        dataset_id=job["dataset_id"],
        arch=request.arch,
        recipe=request.resolved_recipe().model_dump(),
        publish=job["publish"],
        epoch=job["epoch"],
        epochs=job["epochs"],
        loss=job["loss"],
        train_accuracy=job["train_accuracy"],
        metrics=job["metrics"],
        error=job["error"],
        model=job["model"] if job["status"] == "succeeded" else None,
        image_epochs=job["epochs"] * job["train_images"],
        attempts=job["attempts"],
        created_at=job["created_at"],
        started_at=job["started_at"],
        finished_at=job["finished_at"],
    )


def admin_job_view(job: dict[str, Any]) -> AdminJobView:
    return AdminJobView(
        **job_view(job).model_dump(), client_id=job["client_id"], requested_model=job["model"]
    )


@router.post("", status_code=status.HTTP_202_ACCEPTED, responses=_SUBMIT_ERRORS)
def submit_job(body: TrainingJobRequest, client: ClientDep, service: ServiceDep) -> JobQueued:
    """Queue a training job; poll ``GET /v1/training-jobs/{job_id}`` for its progress."""
    job = queue_job(service, client, body)
    service.workers.ensure_started()
    return JobQueued(
        job_id=job["job_id"],
        status="queued",
        model=job["model"],
        image_epochs=job["epochs"] * job["train_images"],
    )


def queue_job(service: TargetService, client: Client, body: TrainingJobRequest) -> dict[str, Any]:
    dataset = service.store.get_dataset(body.dataset_id, client.client_id)
    recipe = body.resolved_recipe()
    shape = tuple(dataset["shape"])
    try:
        check_input_shape(body.arch, (shape[0], shape[1], shape[2]), dataset["classes"])
    except ValueError as exc:
        raise InvalidInput(str(exc), code="arch_rejects_data") from None
    if body.test_dataset_id is not None:
        test = service.store.get_dataset(body.test_dataset_id, client.client_id)
        if test["shape"] != dataset["shape"] or test["classes"] > dataset["classes"]:
            raise InvalidInput(
                f"the test dataset ({test['shape']}, {test['classes']} classes) does not fit "
                f"the training data ({dataset['shape']}, {dataset['classes']} classes)",
                code="test_dataset_mismatch",
            )
    n_train = train_size(dataset["n"], recipe)
    if n_train < 1:
        raise InvalidInput(
            f"validation_split {recipe.validation_split} leaves no training image of "
            f"{dataset['n']}",
            code="invalid_recipe",
        )
    spec = {
        "request": body.model_dump(mode="json"),
        "input_shape": dataset["shape"],
        "classes": dataset["classes"],
        "dataset_name": dataset["name"],
    }
    return service.store.submit_job(
        {
            "job_id": uuid.uuid4().hex[:16],
            "client_id": client.client_id,
            "dataset_id": body.dataset_id,
            "spec": spec,
            "model": hosted_name(client.name, body.name),
            "publish": body.publish,
            "epochs": recipe.epochs,
            "train_images": n_train,
        },
        test_dataset_id=body.test_dataset_id,
    )


@router.get("")
def list_jobs(client: ClientDep, service: ServiceDep) -> list[JobView]:
    return [job_view(job) for job in service.store.list_jobs(client.client_id)]


@router.get("/{job_id}", responses=_ERRORS)
def get_job(job_id: str, client: ClientDep, service: ServiceDep) -> JobView:
    return job_view(service.store.get_job(job_id, client.client_id))


@router.delete("/{job_id}", responses=_ERRORS)
def cancel_job(job_id: str, client: ClientDep, service: ServiceDep) -> JobView:
    """Cancel a queued or running job; the image-epochs it did not run are refunded."""
    return job_view(service.store.cancel_job(job_id, client.client_id))
