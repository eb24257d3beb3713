"""``create_app(settings)``: the FastAPI app, its lifespan, and the one place errors become HTTP."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from target_service.detection import DetectionHub
from target_service.errors import ServiceError
from target_service.metrics import ServiceMetrics
from target_service.routes import admin, public
from target_service.service import TargetService
from target_service.settings import Settings
from target_service.state import StateStore
from target_service.zoo import load_hosted

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(settings.torch_threads)
        store = StateStore(settings.state_path)
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
        )
        app.state.service = TargetService(settings, store, models, metrics, detection)
        logger.info("serving %s with state in %s", sorted(models), settings.state_path)
        try:
            yield
        finally:
            detection.close()
            store.close()

    app = FastAPI(
        title="mlaas-range target service",
        version="1",
        description="Label-only image classifiers behind API keys and query budgets.",
        lifespan=lifespan,
    )
    app.include_router(public.router)
    app.include_router(admin.router)
    app.add_middleware(RequestBodyGuard, max_bytes=settings.max_body_bytes)
    _install_error_handlers(app)
    return app


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _install_error_handlers(app: FastAPI) -> None:
    def refuse(request: Request, status: int, code: str, message: str) -> JSONResponse:
        service = getattr(request.app.state, "service", None)
        if service is not None:
            service.metrics.refusals.labels(code).inc()
        return JSONResponse(error_body(code, message), status_code=status)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return refuse(request, exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(error.get("type") == "json_invalid" for error in errors):
            return refuse(request, 422, "malformed_json", "the request body is not valid JSON")
        if any(tuple(error.get("loc", ())) == ("body",) for error in errors):
            return refuse(request, 422, "invalid_input", "the request body must be a JSON object")
        parts = []
        for error in errors[:5]:
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
            parts.append(f"{where or 'body'}: {error.get('msg')}")
        return refuse(request, 422, "invalid_input", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return refuse(request, exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return refuse(request, 500, "internal_error", "internal error; nothing was charged")


class RequestBodyGuard:
    """Refuse bodies over ``max_bytes`` with 413 before anything parses them, and read a JSON
    object body as JSON whatever Content-Type came with it (``curl -d`` says form-urlencoded).

    Relaxing the Content-Type is safe here: every route needs an ``Authorization`` header, which
    a cross-site browser request cannot send without a CORS preflight.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(scope, send)
                return
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False
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

    async def _too_large(self, scope: Scope, send: Send) -> None:
        service = getattr(scope["app"].state, "service", None) if "app" in scope else None
        if service is not None:
            service.metrics.refusals.labels("body_too_large").inc()
        payload = json.dumps(
            error_body("body_too_large", f"request body over the limit of {self.max_bytes} bytes")
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
