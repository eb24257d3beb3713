"""Routes every customer sees: health, the model list and predict; and /metrics (admin token
unless ``TARGET_METRICS_PUBLIC=true``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mlcore.wire import ModelInfo, ModelList, PredictRequest, PredictResponse
from target_service.deps import ClientDep, MetricsDep, ServiceDep
from target_service.errors import BODY_STATUSES, documented

router = APIRouter()

_PREDICT_ERRORS = documented(*BODY_STATUSES, 401, 402, 403, 404, 409, 429)


@router.get("/health")
def health(service: ServiceDep) -> dict[str, Any]:
    return {"status": "ok", "models": sorted(service.models)}


@router.get("/metrics", response_class=Response, responses=documented(401, 403))
def metrics(service: ServiceDep, _: MetricsDep) -> Response:
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


@router.post("/v1/models/{name}/predict", response_model=PredictResponse, responses=_PREDICT_ERRORS)
def predict(
    name: str, body: PredictRequest, client: ClientDep, service: ServiceDep, request: Request
) -> Any:
    """One image is one query. A repeated ``request_id`` returns the stored answer, uncharged,
    as it was first rendered (even if the model's output policy changed since)."""
    request.state.charging = True  # from here on, a 500 may come after the charge
    return service.predict(client, name, body)
