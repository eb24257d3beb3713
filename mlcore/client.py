"""The one HTTP client of the target service's API: predict, models, datasets, training jobs,
membership challenges.

Both command lines use it (the attacker's ``HttpOracle`` buys labels through ``predict``; the
defender uploads and trains), so retries and error handling exist once, here:

- a request that may be repeated safely (every GET and DELETE, and a predict that carries a
  ``request_id``: the server answers a repeat from its stored answer without charging again)
  is retried with exponential backoff and jitter on 429, 5xx and network errors;
- a request that creates something (an upload, a job) is retried only on 429, which the
  service answers before doing anything, so a retry never creates a second dataset or job;
- every refusal becomes an exception from the service's own ``{"error": {"code", "message"}}``::

    ServiceError (status, code, message)
    ├── Rejected        4xx: the request is wrong (key, input, name taken...)
    │   ├── BudgetExhausted  402 (query budget or training quota)
    │   ├── Blocked          403
    │   └── NotFound         404
    └── Unavailable     429 / 5xx / network errors that outlasted every retry
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
from pydantic import TypeAdapter, ValidationError

from mlcore.wire import PredictResponse, encode_tensor

logger = logging.getLogger(__name__)

FINAL_JOB_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class ServiceError(Exception):
    """A request the service refused or could not answer; ``status`` is None for network
    errors, ``code`` is the service's error code."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "") -> None:
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


class Rejected(ServiceError):
    """A 4xx: the request itself is wrong and repeating it will not help."""


class BudgetExhausted(Rejected):
    """402: the query budget (or the training quota) cannot pay for this request."""


class Blocked(Rejected):
    """403: refused by the service (blocked by a detector, or not allowed)."""


class NotFound(Rejected):
    """404: no such model, dataset or job (or not yours)."""


class Unavailable(ServiceError):
    """429, 5xx or network errors that outlasted every retry."""


_REJECTIONS: dict[int, type[Rejected]] = {402: BudgetExhausted, 403: Blocked, 404: NotFound}


@dataclass(frozen=True)
class Prediction:
    """A predict answer, read: ``labels`` has one entry per image, ``None`` where an input
    defence rejected the image (those indices are in ``rejected``; a rejected image is charged
    like an answered one)."""

    labels: list[int | None]
    rejected: list[int]
    charged: int
    queries_used: int
    queries_remaining: int


_PREDICT_RESPONSE: TypeAdapter[PredictResponse] = TypeAdapter(PredictResponse)


def read_prediction(body: Any) -> Prediction:
    """Check a predict answer against the wire schema (any output policy, with or without an
    input defence that rejects); raise ServiceError when it does not fit."""
    try:
        answer = _PREDICT_RESPONSE.validate_python(body)
    except ValidationError as exc:
        raise ServiceError(f"the service's predict answer does not fit the schema: {exc}") from None
    return Prediction(
        labels=list(answer.labels),
        rejected=list(getattr(answer, "rejected", [])),
        charged=answer.charged,
        queries_used=answer.queries_used,
        queries_remaining=answer.queries_remaining,
    )


@dataclass(frozen=True)
class Reply:
    """A 2xx answer: its JSON body, and how many attempts it took (1 = no retry)."""

    body: Any
    attempts: int


class ServiceClient:
    """The target service at ``url``, as one API key (or none) sees it."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        max_retries: int = 6,
        backoff: float = 0.25,
        timeout: float = 60.0,
        client: httpx2.Client | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff < 0:
            raise ValueError(f"backoff must be >= 0 seconds, got {backoff}")
        self.url = url.rstrip("/")
        self.max_retries, self.backoff = max_retries, backoff
        self._http = client or httpx2.Client(base_url=self.url, timeout=timeout)
        self._headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- the one request loop ----------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        repeatable: bool,
        json: Any = None,
        content: bytes | Iterator[bytes] | None = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """Send one request; retry as the module docstring says; raise ServiceError."""
        headers = {**self._headers, **(headers or {})}
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(
                    method, path, json=json, content=content, params=params, headers=headers
                )
            except httpx2.TransportError as exc:
                if not repeatable:
                    raise Unavailable(f"network error on {method} {path}: {exc!r}") from exc
                problem = f"network error: {exc!r}"
            else:
                if response.is_success:
                    return Reply(response.json() if response.content else None, attempt + 1)
                status, code, message = _error(response)
                retryable = status == 429 or (repeatable and status >= 500)
                if not retryable:
                    kind = _REJECTIONS.get(status, Rejected if status < 500 else Unavailable)
                    raise kind(f"HTTP {status} {code}: {message}", status=status, code=code)
                problem = f"HTTP {status} {code}: {message}"
            if attempt == self.max_retries:
                raise Unavailable(f"gave up after {attempt + 1} attempts; last: {problem}")
            delay = self.backoff * 2**attempt * (0.5 + random.random())
            logger.warning("%s; retrying in %.2f s", problem, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    # -- predict and models ------------------------------------------------------------------
    def predict(self, model: str, images: np.ndarray, *, request_id: str | None = None) -> Reply:
        """One batch; without ``request_id`` it is sent once (a repeat could be charged twice).
        ``read_prediction(reply.body)`` reads the answer (labels may be ``None``: rejected)."""
        body: dict[str, Any] = {"inputs": encode_tensor(images).model_dump()}
        if request_id is not None:
            body["request_id"] = request_id
        return self.request(
            "POST", f"/v1/models/{model}/predict", json=body, repeatable=request_id is not None
        )

    def models(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/models", repeatable=True).body["models"]

    # -- datasets ----------------------------------------------------------------------------
    def upload_dataset(
        self, path: str | Path, *, name: str, classes: int | None = None
    ) -> dict[str, Any]:
        """Upload an npz (``images``, ``labels``); returns the service's dataset record."""
        params: dict[str, Any] = {"name": name}
        if classes is not None:
            params["classes"] = classes
        return self.request(
            "POST",
            "/v1/datasets",
            content=Path(path).read_bytes(),
            params=params,
            headers={"Content-Type": "application/octet-stream"},
            repeatable=False,
        ).body

    def datasets(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/datasets", repeatable=True).body

    def delete_dataset(self, dataset_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/datasets/{dataset_id}", repeatable=True).body

    # -- training jobs -----------------------------------------------------------------------
    def submit_job(self, **job: Any) -> dict[str, Any]:
        """``POST /v1/training-jobs`` with the fields the service documents; returns
        ``{"job_id", "status": "queued", "model", "image_epochs"}``."""
        body = {key: value for key, value in job.items() if value is not None}
        return self.request("POST", "/v1/training-jobs", json=body, repeatable=False).body

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/training-jobs/{job_id}", repeatable=True).body

    def jobs(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/training-jobs", repeatable=True).body

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/training-jobs/{job_id}", repeatable=True).body

    # -- membership challenges ---------------------------------------------------------------
    def membership_challenge(self, challenge_id: str) -> dict[str, Any]:
        """A challenge opened for this key: candidates (images, labels) and the budget left."""
        return self.request(
            "GET", f"/v1/membership-challenges/{challenge_id}", repeatable=True
        ).body

    def submit_membership_scores(self, challenge_id: str, scores: list[float]) -> dict[str, Any]:
        """Submit one score per candidate, once (retried only on 429: a repeat would be 409)."""
        return self.request(
            "POST",
            f"/v1/membership-challenges/{challenge_id}/scores",
            json={"scores": scores},
            repeatable=False,
        ).body

    def wait_for_job(
        self,
        job_id: str,
        *,
        poll: float = 1.0,
        timeout: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll a job until it is succeeded, failed or cancelled; ``on_update`` sees each poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in FINAL_JOB_STATUSES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:g} s")
            time.sleep(poll)


def _error(response: httpx2.Response) -> tuple[int, str, str]:
    """(status, code, message) of an error answer, from the service's error shape if it has it."""
    try:
        error = response.json()["error"]
        return response.status_code, str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return response.status_code, "http_error", response.text[:200]
