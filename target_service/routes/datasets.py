"""Dataset uploads: ``POST /v1/datasets?name=N`` with an npz body, list, get, delete.

The body is streamed to a temporary file (never whole in memory), with the size limit enforced
while it arrives (413), then validated with numpy (``datasets.validate_npz``) and renamed into
place. A dataset is visible to its owner only; anyone else gets 404.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, status
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from target_service.datasets import declared_members, validate_npz
from target_service.deps import ClientDep, ServiceDep
from target_service.errors import BODY_STATUSES, BodyTimeout, body_too_large, documented
from target_service.service import TargetService

router = APIRouter(prefix="/v1/datasets", tags=["training"])

_UPLOAD_ERRORS = documented(*BODY_STATUSES, 401)
_ERRORS = documented(401, 404, 422)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class DatasetView(BaseModel):
    dataset_id: str
    name: str
    n: int
    shape: list[int]
    dtype: str
    classes: int
    sha256: str
    bytes: int
    created_at: float


class AdminDatasetView(DatasetView):
    client_id: str


def dataset_view(row: dict[str, Any]) -> DatasetView:
    return DatasetView(**{key: row[key] for key in DatasetView.model_fields})


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses=_UPLOAD_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def upload_dataset(
    request: Request,
    client: ClientDep,
    service: ServiceDep,
    name: Annotated[str, Query(pattern=NAME_PATTERN, description="Your name for the dataset.")],
    classes: Annotated[
        int | None, Query(ge=2, description="Number of classes; default: largest label + 1.")
    ] = None,
) -> DatasetView:
    """The body is an ``.npz`` with ``images`` (uint8 (N, C, H, W) or (N, H, W), or float32 in
    [0, 1]) and ``labels`` (integers 0..classes-1), and optionally ``provenance`` (a JSON
    string; its ``members`` become the members of models trained on it)."""
    settings = service.settings
    limit = settings.max_dataset_bytes  # a declared Content-Length over it: 413 in app.py
    dataset_id = uuid.uuid4().hex[:16]
    temporary = service.dataset_files.temporary(dataset_id)
    try:
        digest, size = hashlib.sha256(), 0
        with temporary.open("wb") as handle:
            try:
                async with asyncio.timeout(settings.body_timeout):
                    async for chunk in request.stream():
                        size += len(chunk)
                        if size > limit:
                            raise body_too_large(limit)
                        digest.update(chunk)
                        handle.write(chunk)
            except TimeoutError:
                raise BodyTimeout(
                    f"the request body did not arrive within {settings.body_timeout:g} s"
                ) from None
        summary = await run_in_threadpool(
            validate_npz,
            temporary,
            classes=classes,
            max_classes=settings.max_dataset_classes,
            max_unpacked_bytes=settings.max_dataset_unpacked_bytes,
        )
        await run_in_threadpool(declared_members, temporary, data_root=settings.data_root)
        service.dataset_files.keep(temporary, dataset_id)
    finally:
        temporary.unlink(missing_ok=True)
    row: dict[str, Any] = {
        "dataset_id": dataset_id,
        "client_id": client.client_id,
        "name": name,
        "n": summary.n,
        "shape": summary.shape,
        "dtype": summary.dtype,
        "classes": summary.classes,
        "sha256": digest.hexdigest(),
        "bytes": size,
        "created_at": time.time(),
    }
    try:
        service.store.add_dataset(row)
    except BaseException:
        service.dataset_files.remove(dataset_id)
        raise
    return DatasetView(**{k: v for k, v in row.items() if k != "client_id"})


@router.get("")
def list_datasets(client: ClientDep, service: ServiceDep) -> list[DatasetView]:
    return [dataset_view(row) for row in service.store.list_datasets(client.client_id)]


@router.get("/{dataset_id}", responses=_ERRORS)
def get_dataset(dataset_id: str, client: ClientDep, service: ServiceDep) -> DatasetView:
    return dataset_view(service.store.get_dataset(dataset_id, client.client_id))


@router.delete("/{dataset_id}", responses=_ERRORS)
def delete_dataset(dataset_id: str, client: ClientDep, service: ServiceDep) -> DatasetView:
    return dataset_view(remove_dataset(service, dataset_id, client.client_id))


def remove_dataset(service: TargetService, dataset_id: str, client_id: str | None) -> dict:
    """Delete the row, then the file (the owner's route, and the admin's with no owner)."""
    row = service.store.delete_dataset(dataset_id, client_id)
    service.dataset_files.remove(dataset_id)
    return row
