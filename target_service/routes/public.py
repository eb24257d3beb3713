"""Routes every customer sees: health, the model list and predict; and /metrics (admin token
unless ``TARGET_METRICS_PUBLIC=true``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mlcore.wire import ModelInfo, ModelList, PredictRequest, PredictResponse
from target_service.deps import ClientDep, MetricsDep, OptionalClientDep, ServiceDep
from target_service.errors import BODY_STATUSES, documented

router = APIRouter()

_PREDICT_ERRORS = documented(*BODY_STATUSES, 401, 402, 403, 404, 409, 429)


@router.get("/health")
def health(service: ServiceDep) -> dict[str, Any]:
    return {"status": "ok", "models": sorted(service.models)}


@router.get("/metrics", response_class=Response, responses=documented(401, 403))
def metrics(service: ServiceDep, _: MetricsDep) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", responses=documented(401))
def list_models(service: ServiceDep, client: OptionalClientDep) -> ModelList:
    """The operator's models and every public client model; with an API key, also the
    caller's own private models (another client's private model is never listed)."""
    cards = service.model_cards(client.client_id if client else None)
    return ModelList(
        models=[ModelInfo(**card, input_dtypes=["uint8", "float32"]) for card in cards]
    )


@router.post(
    "/v1/models/{name:path}/predict", response_model=PredictResponse, responses=_PREDICT_ERRORS
)
def predict(
    name: str, body: PredictRequest, client: ClientDep, service: ServiceDep, request: Request
) -> Any:
    """One image is one query. A repeated ``request_id`` returns the stored answer, uncharged,
    as it was first rendered (even if the model's output policy changed since). Clients' trained
    models are named ``u/<client-name>/<name>``."""
    request.state.charging = True  # from here on, a 500 may come after the charge
    return service.predict(client, name, body)
