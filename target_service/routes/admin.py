"""Admin routes (separate admin token): clients, budgets and the defence-evaluation view."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict, Field

from mlcore.wire import ErrorResponse
from target_service.deps import AdminDep, ServiceDep
from target_service.state import Client

router = APIRouter(
    prefix="/v1/admin", responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}}
)


class ClientCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    budget: int = Field(ge=0, le=10**12)


class ClientCreated(BaseModel):
    client_id: str
    name: str
    api_key: str = Field(description="Shown once; the service keeps only its hash.")
    budget: int


class ClientView(BaseModel):
    client_id: str
    name: str
    budget: int
    queries_used: int
    queries_remaining: int
    revoked: bool
    created_at: float
    detectors: dict[str, Any] = Field(default_factory=dict)


def _view(client: Client) -> ClientView:
    return ClientView(
        client_id=client.client_id,
        name=client.name,
        budget=client.budget,
        queries_used=client.used,
        queries_remaining=client.remaining,
        revoked=client.revoked,
        created_at=client.created_at,
    )


@router.post("/clients", status_code=status.HTTP_201_CREATED)
def create_client(body: ClientCreate, service: ServiceDep, _: AdminDep) -> ClientCreated:
    client, api_key = service.store.create_client(body.name, body.budget)
    return ClientCreated(
        client_id=client.client_id, name=client.name, api_key=api_key, budget=client.budget
    )


@router.get("/clients")
def list_clients(service: ServiceDep, _: AdminDep) -> list[ClientView]:
    return [_view(client) for client in service.store.list_clients()]


@router.get("/clients/{client_id}", responses={404: {"model": ErrorResponse}})
def get_client(client_id: str, service: ServiceDep, _: AdminDep) -> ClientView:
    return _view(service.store.get_client(client_id))


@router.delete("/clients/{client_id}", responses={404: {"model": ErrorResponse}})
def revoke_client(client_id: str, service: ServiceDep, _: AdminDep) -> ClientView:
    return _view(service.store.revoke_client(client_id))
