"""FastAPI dependencies as ``Annotated`` aliases: the service, the calling client, the admin."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from target_service.errors import Forbidden, Unauthorized
from target_service.service import TargetService
from target_service.state import Client

_bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def get_service(request: Request) -> TargetService:
    return request.app.state.service


ServiceDep = Annotated[TargetService, Depends(get_service)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise Unauthorized(
            "missing 'Authorization: Bearer <api key>' header", code="missing_api_key"
        )
    return credentials.credentials


def get_client(service: ServiceDep, credentials: Credentials) -> Client:
    return service.store.authenticate(_token(credentials))


def get_optional_client(service: ServiceDep, credentials: Credentials) -> Client | None:
    """The calling client when a key is sent (401 if it is not valid), else None."""
    return None if credentials is None else get_client(service, credentials)


def require_admin(service: ServiceDep, credentials: Credentials) -> None:
    token = _token(credentials)
    admin = service.settings.admin_token
    if admin is None:
        raise Forbidden("the admin API is disabled: set TARGET_ADMIN_TOKEN", code="admin_disabled")
    if not hmac.compare_digest(token.encode(), admin.get_secret_value().encode()):
        raise Forbidden("admin token required", code="not_admin")


ClientDep = Annotated[Client, Depends(get_client)]
AdminDep = Annotated[None, Depends(require_admin)]
OptionalClientDep = Annotated[Client | None, Depends(get_optional_client)]
