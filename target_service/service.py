"""The prediction service without HTTP: validate, answer, charge, in that order.

Nothing is charged until the answer exists and every check has passed; the charge, the ledger
entry and the stored answer then land in one transaction (see ``state.py``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any

import numpy as np
import torch

from mlcore.wire import PredictRequest, TensorTooLarge, WireError, decode_tensor, echo
from target_service.datasets import DatasetFiles
from target_service.detection import DetectionHub
from target_service.errors import (
    BudgetExhausted,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
)
from target_service.metrics import ServiceMetrics
from target_service.rate_limit import RateLimiter
from target_service.screening import ScreeningHub
from target_service.settings import Settings
from target_service.state import Client, StateStore
from target_service.worker import WorkerPool
from target_service.zoo import HostedModel, load_user_model, model_card, user_model_card

logger = logging.getLogger(__name__)


class TargetService:
    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        models: dict[str, HostedModel],
        metrics: ServiceMetrics,
        detection: DetectionHub,
        screening: ScreeningHub | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.models = models
        self.metrics = metrics
        self.detection = detection
        self.screening = screening or ScreeningHub(
            store, {}, metrics=metrics, alarm_policies={}, stream_lock=detection.stream_lock
        )
        self.rate_limiter = RateLimiter(settings.rate_limit, settings.rate_burst)
        self.workers = WorkerPool(settings)
        self.dataset_files = DatasetFiles(settings.state_dir / "datasets")
        self._user_models: dict[str, HostedModel] = {}
        self._user_models_lock = threading.Lock()

    def model(self, name: str, client_id: str | None = None) -> HostedModel:
        """A hosted model as ``client_id`` may see it: another client's private model is
        "not found", exactly like a name that does not exist."""
        hosted = self.models.get(name) or self._user_model(name)
        if hosted is None or not hosted.visible_to(client_id):
            raise NotFound(
                f"no model named {echo(name)}; the operator hosts {sorted(self.models)}, "
                "and GET /v1/models lists every model you can use",
                code="unknown_model",
            )
        return hosted

    def model_cards(self, client_id: str | None) -> list[dict[str, Any]]:
        """``GET /v1/models``: the operator's models, then every public client model and the
        caller's own private ones (read from the jobs: listing loads no model)."""
        return [
            *(model_card(hosted) for hosted in self.models.values()),
            *(
                user_model_card(job)
                for job in self.store.hosted_jobs()
                if job["publish"] == "public" or job["client_id"] == client_id
            ),
        ]

    def _user_model(self, name: str) -> HostedModel | None:
        """A client's trained model, loaded from its job's checkpoint on first use (the API
        process learns of new models from the state database, not from the workers)."""
        if not name.startswith("u/"):
            return None
        with self._user_models_lock:
            hosted = self._user_models.get(name)
            if hosted is None:
                job = self.store.hosted_job(name)
                if job is None:
                    return None
                hosted = load_user_model(job, self.settings.state_dir)
                self.detection.add_model(name, hosted.defence)
                self._user_models[name] = hosted
                logger.info("hosting %s (job %s)", name, job["job_id"])
        return hosted

    def predict(self, client: Client, name: str, request: PredictRequest) -> dict[str, Any]:
        started = time.perf_counter()
        hosted = self.model(name, client.client_id)
        self.rate_limiter.check(client.client_id)
        images = self._decode(hosted, request)
        fingerprint = _fingerprint(name, images)
        if request.request_id is not None:
            stored = self.store.replay(client.client_id, request.request_id, fingerprint)
            if stored is not None:
                return stored
        self._refuse_if_blocked(client.client_id, name)  # cheap early refusal, re-checked below
        if len(images) > client.remaining:  # cheap early refusal; the charge re-checks atomically
            raise BudgetExhausted(
                f"a batch of {len(images)} image(s) does not fit the remaining budget of "
                f"{client.remaining} queries"
            )
        x = torch.from_numpy(_as_float(images))
        screen = self.screening.screen_for(name)
        if screen is None:
            logits = hosted.logits(x)
            answer, screening = hosted.policy.render(logits), None
            labels = logits.argmax(dim=1).tolist()
        else:  # one forward pass of the model and of its sanitised twin
            screened = screen.screen(x, hosted.policy)
            answer, labels, screening = screened.answer, screened.labels, screened.screening
        watched = self.detection.watches(name)
        inline = watched and self.detection.inline  # else the detection worker reads the log
        with self.detection.stream_lock(client.client_id, name):
            if inline:  # detectors in error are rebuilt first: their alarms count from now
                self.detection.catch_up(client.client_id, name)
            if screen is not None:
                self.screening.catch_up(client.client_id, name)
            # Under the stream lock, after every earlier request of this client was observed:
            # no request is charged once a blocking alarm is recorded.
            self._refuse_if_blocked(client.client_id, name)
            charge = self.store.charge(
                client.client_id,
                model=name,
                images=len(images),
                request_id=request.request_id,
                fingerprint=fingerprint,
                response=answer,
                observation=images if watched else None,
                observed_labels=labels,
                screening=screening,
            )
            if inline and charge.entry_id is not None:
                self._observe(client.client_id, name, images, labels, charge.entry_id)
            if screening is not None and charge.entry_id is not None:
                try:  # the screening is in the table: a restart replays it
                    self.screening.observe(client.client_id, name, charge.entry_id, screening)
                except Exception:
                    logger.exception(
                        "input screening failed on client %s, model %s", client.client_id, name
                    )
        if not charge.replayed:
            self.metrics.queries.labels(name).inc(len(images))
            self.metrics.requests.labels(name).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - started)
        return charge.response

    def is_blocked(self, client_id: str, name: str) -> bool:
        return self.detection.is_blocked(client_id, name) or self.screening.is_blocked(
            client_id, name
        )

    def _refuse_if_blocked(self, client_id: str, name: str) -> None:
        if self.detection.is_blocked(client_id, name):
            raise Forbidden(
                f"this client is blocked on {name}: a model-stealing detector raised an alarm",
                code="blocked",
            )
        if self.screening.is_blocked(client_id, name):
            raise Forbidden(
                f"this client is blocked on {name}: too many of its images were rejected as "
                "adversarial by the input defence",
                code="blocked",
            )

    def _observe(
        self, client_id: str, name: str, images: np.ndarray, labels: list[int], entry_id: int
    ) -> None:
        """Detectors see the charged request. The hub records a failing detector itself; this
        guard is for the machinery around them (the store, snapshots): such a failure never
        loses the answer, as the query is in the log and a restart replays it."""
        try:
            self.detection.observe(client_id, name, images, labels, entry_id)
        except Exception:
            logger.exception("detectors failed on client %s, model %s", client_id, name)

    def _decode(self, hosted: HostedModel, request: PredictRequest) -> np.ndarray:
        limit = self.settings.max_batch * int(np.prod(hosted.input_shape))
        try:
            images = decode_tensor(request.inputs, max_elements=limit)
        except TensorTooLarge as exc:
            raise PayloadTooLarge(
                f"{exc}: at most {self.settings.max_batch} images per request",
                code="batch_too_large",
            ) from None
        except WireError as exc:
            raise InvalidInput(str(exc)) from None
        expected = list(hosted.input_shape)
        if images.ndim != 4 or list(images.shape[1:]) != expected:
            raise InvalidInput(
                f"inputs must have shape [n, {', '.join(map(str, expected))}] for {hosted.name}, "
                f"got {list(images.shape)}",
                code="invalid_shape",
            )
        if len(images) == 0:
            raise InvalidInput("inputs hold no images (empty batch)", code="empty_batch")
        if len(images) > self.settings.max_batch:
            raise PayloadTooLarge(
                f"a batch of {len(images)} images is over the limit of {self.settings.max_batch}",
                code="batch_too_large",
            )
        return images


def _as_float(images: np.ndarray) -> np.ndarray:
    return (
        images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    )


def _fingerprint(model: str, images: np.ndarray) -> str:
    digest = hashlib.sha256(f"{model}|{images.dtype}|{images.shape}|".encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()
