"""FastAPI dependencies as ``Annotated`` aliases: the service, the calling client, the admin.

A route says who may call it by depending on ``ClientDep``, ``AdminDep`` or ``MetricsDep``; the
check itself runs earlier, in ``app.AuthGate``, before a byte of the body is read (a caller
without a valid key costs the service no parsing). The gate leaves the authenticated client in
``request.state.client`` for ``ClientDep``.
"""

from __future__ import annotations

import enum
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from target_service.errors import Forbidden, Unauthorized
from target_service.service import TargetService
from target_service.state import Client

_bearer = HTTPBearer(auto_error=False)  # documents the scheme in OpenAPI; AuthGate checks it
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


class Access(enum.Enum):
    CLIENT = "a client's API key"
    ADMIN = "the admin token"
    METRICS = "the admin token unless TARGET_METRICS_PUBLIC=true"


def get_service(request: Request) -> TargetService:
    return request.app.state.service


ServiceDep = Annotated[TargetService, Depends(get_service)]


def check_access(
    service: TargetService, access: Access, authorization: str | None
) -> Client | None:
    """Raise Unauthorized / Forbidden unless ``authorization`` grants ``access``; returns the
    client for ``Access.CLIENT``."""
    if access is Access.METRICS:
        if service.settings.metrics_public:
            return None
        access = Access.ADMIN
    scheme, token = get_authorization_scheme_param(authorization)
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(
            "missing 'Authorization: Bearer <api key>' header", code="missing_api_key"
        )
    if access is Access.CLIENT:
        return service.store.authenticate(token)
    admin = service.settings.admin_token
    if admin is None:
        raise Forbidden("the admin API is disabled: set TARGET_ADMIN_TOKEN", code="admin_disabled")
    if not hmac.compare_digest(token.encode(), admin.get_secret_value().encode()):
        raise Forbidden("admin token required", code="not_admin")
    return None


def get_client(request: Request, _: Credentials) -> Client:
    """The client AuthGate authenticated for this request."""
    return request.state.client


def require_admin(_: Credentials) -> None:
    """Marks a route as admin-only; AuthGate has checked the token."""


def require_metrics_access(_: Credentials) -> None:
    """Marks /metrics; AuthGate checks the admin token unless metrics are public."""


def get_optional_client(request: Request, service: ServiceDep, _: Credentials) -> Client | None:
    """The calling client when a key is sent (401 if it is not valid), else None: a public
    route (no body, so AuthGate leaves it alone) that shows a client more when it says who it is."""
    authorization = request.headers.get("authorization")
    if authorization is None:
        return None
    return check_access(service, Access.CLIENT, authorization)


ClientDep = Annotated[Client, Depends(get_client)]
AdminDep = Annotated[None, Depends(require_admin)]
MetricsDep = Annotated[None, Depends(require_metrics_access)]
OptionalClientDep = Annotated[Client | None, Depends(get_optional_client)]

_ACCESS_BY_DEPENDENCY = {
    get_client: Access.CLIENT,
    require_admin: Access.ADMIN,
    require_metrics_access: Access.METRICS,
}


def route_access(dependant: Dependant) -> Access | None:
    """What a route's dependencies (at any depth) require of its caller; None if public."""
    found = _ACCESS_BY_DEPENDENCY.get(dependant.call) if dependant.call else None
    if found is not None:
        return found
    for sub in dependant.dependencies:
        found = route_access(sub)
        if found is not None:
            return found
    return None
