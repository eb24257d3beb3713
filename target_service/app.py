"""``create_app(settings)``: the FastAPI app, its lifespan, and the one place errors become HTTP."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlcore.wire import echo
from target_service.deps import Access, check_access, route_access
from target_service.detection import DetectionHub
from target_service.errors import (
    BadRequest,
    BodyTimeout,
    LengthRequired,
    ServiceError,
    body_too_large,
    documented,
)
from target_service.metrics import ServiceMetrics
from target_service.routes import admin, datasets, membership, public, training
from target_service.screening import ScreeningHub, load_screens
from target_service.service import TargetService
from target_service.settings import Settings
from target_service.state import open_store
from target_service.zoo import load_hosted

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(settings.torch_threads)
        store = open_store(settings)
        models = {
            name: load_hosted(
                name,
                settings.checkpoint_dir,
                policy=settings.output_policies.get(name, "label-only"),
                train_missing=settings.train_missing,
                data_root=settings.data_root,
                epochs=settings.train_epochs,
                detectors=settings.detectors.get(name),
                alarm_policy=settings.alarm_policies.get(name, "log"),
                calibration_clients=settings.calibration_clients,
            )
            for name in settings.models
        }
        metrics = ServiceMetrics()
        detection = DetectionHub(
            store,
            {name: hosted.defence for name, hosted in models.items()},
            snapshot_dir=settings.state_dir / "detectors",
            metrics=metrics,
            snapshot_every=settings.snapshot_every,
            inline=settings.detection_mode == "inline",
        )
        screening = ScreeningHub(
            store,
            load_screens(
                settings.input_defenses,
                settings.checkpoint_dir,
                build_missing=settings.train_missing,
                data_root=settings.data_root,
            ),
            metrics=metrics,
            alarm_policies=settings.alarm_policies,
            stream_lock=detection.stream_lock,
        )
        service = TargetService(settings, store, models, metrics, detection, screening)
        app.state.service = service
        service.workers.supervise(store)  # also resumes jobs left by a restart or a dead worker
        logger.info("serving %s with state in %s", sorted(models), store.location)
        try:
            yield
        finally:
            service.workers.stop()
            detection.close()
            store.close()

    app = FastAPI(
        title="mlaas-range target service",
        version="1",
        description="Label-only image classifiers behind API keys and query budgets.",
        lifespan=lifespan,
        responses=documented(405, 500, 503),
    )
    app.include_router(public.router)
    app.include_router(admin.router)
    app.include_router(datasets.router)
    app.include_router(training.router)
    app.include_router(membership.router)
    app.include_router(membership.admin_router)
    # the last added runs first: the key is checked, then the body is read
    app.add_middleware(
        RequestBodyGuard,
        max_bytes=settings.max_body_bytes,
        timeout=settings.body_timeout,
        streamed={datasets.router.prefix: settings.max_dataset_bytes},
    )
    app.add_middleware(
        AuthGate,
        routes=[
            *public.router.routes,
            *admin.router.routes,
            *datasets.router.routes,
            *training.router.routes,
            *membership.router.routes,
            *membership.admin_router.routes,
        ],
    )
    _install_error_handlers(app)
    return app


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def refusal(
    app: Any, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The one error response (counted in ``mlaas_refusals`` once the service is up)."""
    service = getattr(app.state, "service", None) if app is not None else None
    if service is not None:
        service.metrics.refusals.labels(code).inc()
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


# A 400 from FastAPI's body parser carries the parser's exception as its cause.
_PARSE_ERRORS: list[tuple[type[BaseException], str, str]] = [
    (RecursionError, "too_deeply_nested", "the JSON body is nested too deeply"),
    (UnicodeDecodeError, "undecodable_body", "the request body is not UTF-8 text"),
]
_STATUSES = {status.value for status in HTTPStatus}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return refusal(request.app, exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(error.get("type") == "json_invalid" for error in errors):
            return refusal(request.app, 422, "malformed_json", "the request body is not valid JSON")
        if any(tuple(error.get("loc", ())) == ("body",) for error in errors):
            return refusal(
                request.app, 422, "invalid_input", "the request body must be a JSON object"
            )
        parts = []
        for error in errors[:5]:
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
            parts.append(f"{echo(where) if where else 'body'}: {error.get('msg')}")
        return refusal(request.app, 422, "invalid_input", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        for cause, code, message in _PARSE_ERRORS:
            if isinstance(exc.__cause__, cause):
                return refusal(request.app, exc.status_code, code, message)
        phrase = HTTPStatus(exc.status_code).phrase if exc.status_code in _STATUSES else "error"
        code = phrase.lower().replace(" ", "_").replace("-", "_")
        return refusal(request.app, exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        if getattr(request.state, "charging", False):
            message = (
                "internal error after the charge step began, so this request may have been "
                "charged (queries_remaining tells); a retry with the same request_id returns "
                "its stored answer without a second charge"
            )
        else:
            message = "internal error; nothing was charged"
        return refusal(request.app, 500, "internal_error", message)


class AuthGate:
    """Check the key a route needs before anything reads the body.

    ``routes`` are the app's routes; what each needs is read from its dependencies
    (``deps.route_access``), so a request without a valid key is refused with 401/403 having
    cost a header lookup, not a parse. Paths no protected route matches fall through to the
    router (public routes, 404, 405).
    """

    def __init__(self, app: ASGIApp, *, routes: list[BaseRoute]) -> None:
        self.app = app
        self.protected = [
            (route, access)
            for route in routes
            if isinstance(route, APIRoute) and (access := route_access(route.dependant))
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})  # shared with every copy of the scope downstream
            access = self._route_access(scope)
            if access is not None:
                app = scope["app"]
                try:
                    client = check_access(
                        app.state.service, access, Headers(scope=scope).get("authorization")
                    )
                except ServiceError as exc:
                    await refusal(app, exc.status, exc.code, exc.message)(scope, receive, send)
                    return
                scope["state"]["client"] = client
        await self.app(scope, receive, send)

    def _route_access(self, scope: Scope) -> Access | None:
        for route, access in self.protected:
            if route.matches(scope)[0] is Match.FULL:
                return access
        return None


class RequestBodyGuard:
    """Read a request body whole, within limits, before anything parses it: 413 over
    ``max_bytes``, 408 if it does not arrive within ``timeout`` seconds, 411 without a length or
    chunked encoding, 400 if compressed. A JSON object body is read as JSON whatever
    Content-Type came with it (``curl -d`` says form-urlencoded).

    Relaxing the Content-Type is safe here: every route that takes a body needs an
    ``Authorization`` header, which a cross-site browser request cannot send without a CORS
    preflight. Paths under a ``streamed`` prefix (dataset uploads) get the header checks with
    their own size limit and then pass through unread: their route streams the body to disk,
    enforcing that limit and the same deadline as it goes.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        timeout: float,
        streamed: Mapping[str, int] | None = None,
    ) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout
        self.streamed = dict(streamed or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        streamed_limit = next(
            (limit for prefix, limit in self.streamed.items() if scope["path"].startswith(prefix)),
            None,
        )
        try:
            self._check_headers(Headers(scope=scope), streamed_limit or self.max_bytes)
            if streamed_limit is not None:
                await self.app(scope, receive, send)
                return
            async with asyncio.timeout(self.timeout):
                body = await self._read(receive)
        except TimeoutError:
            exc: ServiceError = BodyTimeout(
                f"the request body did not arrive within {self.timeout:g} s"
            )
            headers = {"connection": "close"}  # the rest of the body may still come: hang up
        except ServiceError as error:
            exc, headers = error, {"connection": "close"}
        else:
            if body is None:  # the client went away
                return
            await self._forward(scope, receive, send, body)
            return
        await refusal(scope.get("app"), exc.status, exc.code, exc.message, headers)(
            scope, receive, send
        )

    def _check_headers(self, headers: Headers, max_bytes: int) -> None:
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise BadRequest(
                f"Content-Encoding {echo(encoding)} is not accepted: send the body uncompressed",
                code="unsupported_content_encoding",
            )
        declared = headers.get("content-length")
        if declared is None:
            if "chunked" not in headers.get("transfer-encoding", "").lower():
                raise LengthRequired(
                    "a request body needs a Content-Length header (or chunked Transfer-Encoding)"
                )
        elif declared.isdigit() and int(declared) > max_bytes:
            raise body_too_large(max_bytes)

    async def _read(self, receive: Receive) -> bytes | None:
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                raise body_too_large(self.max_bytes)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        replayed = False
        if body.lstrip()[:1] == b"{":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
