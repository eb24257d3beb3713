"""Routes every customer sees: health, metrics, the model list and predict."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mlcore.wire import ErrorResponse, ModelInfo, ModelList, PredictRequest, PredictResponse
from target_service.deps import ClientDep, OptionalClientDep, ServiceDep

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (401, 402, 403, 404, 409, 413, 422, 429)
}


@router.get("/health")
def health(service: ServiceDep) -> dict[str, Any]:
    return {"status": "ok", "models": sorted(service.models)}


@router.get("/metrics", response_class=Response)
def metrics(service: ServiceDep) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", responses={401: {"model": ErrorResponse}})
def list_models(service: ServiceDep, client: OptionalClientDep) -> ModelList:
    """The operator's models and every public client model; with an API key, also the
    caller's own private models (another client's private model is never listed)."""
    cards = service.model_cards(client.client_id if client else None)
    return ModelList(
        models=[ModelInfo(**card, input_dtypes=["uint8", "float32"]) for card in cards]
    )


@router.post("/v1/models/{name:path}/predict", response_model=PredictResponse, responses=_ERRORS)
def predict(name: str, body: PredictRequest, client: ClientDep, service: ServiceDep) -> Any:
    """One image is one query. A repeated ``request_id`` returns the stored answer, uncharged.
    Clients' trained models are named ``u/<client-name>/<name>``."""
    answer = service.predict(client, name, body)
    return service.model(name, client.client_id).policy.response_model(**answer)
