"""Oracles: the victim as the attacker sees it, a narrow ``predict_labels`` protocol.

``HttpOracle`` buys labels from a target service over HTTP; ``LocalOracle`` answers from a
checkpoint, for experiments without a server. Errors form one hierarchy:

    OracleError
    ├── BudgetExhausted    402: the budget cannot pay for the next batch (labels so far kept)
    ├── Blocked            403: a detector blocked this client
    ├── OracleRejected     any other 4xx: the request itself is wrong (key, model, input)
    └── OracleUnavailable  429/5xx/network errors that outlasted every retry
"""

from __future__ import annotations

import hashlib
import logging
import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import httpx2
import numpy as np
import torch

from mlcore.checkpoints import load_checkpoint
from mlcore.training import predict_labels
from mlcore.wire import encode_tensor

logger = logging.getLogger(__name__)


class OracleError(Exception):
    """Base of every oracle failure."""


class BudgetExhausted(OracleError):
    """The service refused a batch for lack of budget.

    ``labels`` has one entry per requested image: the label bought (or cached), -1 where none was.
    """

    def __init__(self, message: str, labels: np.ndarray) -> None:
        super().__init__(message)
        self.labels = labels


class Blocked(OracleError):
    """A detector blocked this client; ``labels`` as for BudgetExhausted."""

    def __init__(self, message: str, labels: np.ndarray) -> None:
        super().__init__(message)
        self.labels = labels


class OracleRejected(OracleError):
    """The service rejected the request itself (bad key, unknown model, bad input)."""


class OracleUnavailable(OracleError):
    """The service kept failing (429, 5xx or network) after every retry."""


class LabelOracle(Protocol):
    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (n, C, H, W) -> int64 labels (n,)."""
        ...


class LocalOracle:
    """Answers from a model in this process; counts queries like a service would."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        self.queries = 0

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> LocalOracle:
        return cls(load_checkpoint(path).model)

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        self.queries += len(images)
        return predict_labels(self.model, torch.from_numpy(np.ascontiguousarray(images))).numpy()


class AnswerCache:
    """Labels already bought, keyed by (target, image bytes), in SQLite: a re-run never pays twice."""

    def __init__(self, path: str | Path, namespace: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, label INTEGER)")
        self._namespace = namespace

    def key(self, image: np.ndarray) -> str:
        digest = hashlib.sha256(self._namespace.encode())
        digest.update(np.ascontiguousarray(image).tobytes())
        return digest.hexdigest()

    def get_many(self, keys: list[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT key, label FROM answers WHERE key IN ({marks})", chunk)
            found.update(dict(rows.fetchall()))
        return found

    def put_many(self, items: list[tuple[str, int]]) -> None:
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?)", items)

    def close(self) -> None:
        self._db.close()


class HttpOracle:
    """Buys labels over HTTP in batches, with retries that never pay twice.

    Each batch carries a ``request_id`` derived from its content, so a retry after a lost answer
    (or a crash of either side) gets the stored answer back instead of being charged again.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        model: str,
        *,
        cache_path: str | Path | None = None,
        batch_size: int = 100,
        max_retries: int = 6,
        backoff: float = 0.25,
        timeout: float = 60.0,
        client: httpx2.Client | None = None,
        on_batch: Callable[[int], None] | None = None,  # told how many labels each step settled
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.url, self.model = url.rstrip("/"), model
        self.batch_size, self.max_retries, self.backoff = batch_size, max_retries, backoff
        self._client = client or httpx2.Client(base_url=self.url, timeout=timeout)
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._cache = AnswerCache(cache_path, f"{self.url}|{model}") if cache_path else None
        self._on_batch = on_batch
        self.queries_bought = 0
        self.cache_hits = 0
        self.queries_remaining: int | None = None

    def close(self) -> None:
        self._client.close()
        if self._cache is not None:
            self._cache.close()

    def __enter__(self) -> HttpOracle:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images)
        labels = np.full(len(images), -1, dtype=np.int64)
        missing = np.arange(len(images))
        if self._cache is not None:
            keys = [self._cache.key(image) for image in images]
            cached = self._cache.get_many(keys)
            for i, key in enumerate(keys):
                if key in cached:
                    labels[i] = cached[key]
            missing = np.flatnonzero(labels < 0)
            self.cache_hits += len(images) - len(missing)
            if self._on_batch is not None and len(missing) < len(images):
                self._on_batch(len(images) - len(missing))
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start : start + self.batch_size]
            try:
                answer = self._buy(images[batch])
            except (BudgetExhausted, Blocked) as exc:
                exc.labels = labels  # what was bought (or cached) so far; -1 where nothing was
                raise
            labels[batch] = answer
            if self._cache is not None:
                self._cache.put_many(
                    [(keys[i], int(label)) for i, label in zip(batch, answer, strict=True)]
                )
            if self._on_batch is not None:
                self._on_batch(len(batch))
        return labels

    def _buy(self, batch: np.ndarray) -> np.ndarray:
        request_id = hashlib.sha256(
            f"{self.model}|{batch.shape}".encode() + batch.tobytes()
        ).hexdigest()[:40]
        body = {"inputs": encode_tensor(batch).model_dump(), "request_id": request_id}
        path = f"/v1/models/{self.model}/predict"
        for attempt in range(self.max_retries + 1):
            try:
                response = self._client.post(path, json=body, headers=self._headers)
            except httpx2.TransportError as exc:
                problem = f"network error: {exc!r}"
            else:
                if response.status_code == 200:
                    payload = response.json()
                    self.queries_bought += len(batch)
                    self.queries_remaining = payload.get("queries_remaining")
                    return np.asarray(payload["labels"], dtype=np.int64)
                message = _error_message(response)
                if response.status_code == 402:
                    raise BudgetExhausted(f"budget exhausted: {message}", np.empty(0, np.int64))
                if response.status_code == 403:
                    raise Blocked(f"blocked by the service: {message}", np.empty(0, np.int64))
                if response.status_code != 429 and response.status_code < 500:
                    raise OracleRejected(f"HTTP {response.status_code}: {message}")
                problem = f"HTTP {response.status_code}: {message}"
            if attempt == self.max_retries:
                raise OracleUnavailable(f"gave up after {attempt + 1} attempts; last: {problem}")
            delay = self.backoff * 2**attempt * (0.5 + random.random())
            logger.warning("%s; retrying in %.2f s with the same request_id", problem, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")


def _error_message(response: httpx2.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
