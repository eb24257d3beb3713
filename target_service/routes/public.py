"""Routes every customer sees: health, metrics, the model list and predict."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mlcore.wire import ErrorResponse, ModelInfo, ModelList, PredictRequest, PredictResponse
from target_service.deps import ClientDep, ServiceDep

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


@router.get("/v1/models")
def list_models(service: ServiceDep) -> ModelList:
    return ModelList(
        models=[
            ModelInfo(
                name=hosted.name,
                dataset=hosted.dataset,
                input_shape=list(hosted.input_shape),
                input_dtypes=["uint8", "float32"],
                num_classes=hosted.num_classes,
                output_policy=hosted.policy.name,
            )
            for hosted in service.models.values()
        ]
    )


@router.post("/v1/models/{name}/predict", response_model=PredictResponse, responses=_ERRORS)
def predict(name: str, body: PredictRequest, client: ClientDep, service: ServiceDep) -> Any:
    """One image is one query. A repeated ``request_id`` returns the stored answer, uncharged."""
    answer = service.predict(client, name, body)
    return service.model(name).policy.response_model(**answer)
