"""Oracles: the victim as the attacker sees it, a narrow ``predict_labels`` protocol.

``HttpOracle`` buys labels from a target service over HTTP; ``LocalOracle`` answers from a
checkpoint, for experiments without a server. Each keeps a ``Meter`` of what its answers cost,
taken from the server's own ``charged`` figures. ``buy`` is the one way every attack buys labels:
it never loses a label bought, spends what is left of the budget after a 402 and says what
stopped it. Errors form one hierarchy:

    OracleError
    ├── BudgetExhausted    402: the budget cannot pay for the next batch (labels so far kept)
    ├── Blocked            403: a detector blocked this client
    ├── OracleRejected     any other 4xx: the request itself is wrong (key, model, input)
    ├── OracleUnavailable  429/5xx/network errors that outlasted every retry
    ├── ProbabilitiesUnavailable  the model answers labels only: names the policy needed
    └── BudgetTooSmall     an attack needs more queries than the budget has left (checked
                           before anything is bought)
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import httpx2
import numpy as np
import torch

from mlcore import client as api
from mlcore.checkpoints import load_checkpoint
from mlcore.client import ServiceClient
from mlcore.divergences import log_probabilities
from mlcore.training import predict_labels, predict_logits

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


PROBABILITIES_POLICY = "probabilities:DECIMALS"


class ProbabilitiesUnavailable(OracleError):
    """The model's output policy gives no probabilities; the message names the policy needed."""


class BudgetTooSmall(OracleError):
    """An attack needs ``needed`` queries and the budget has ``remaining`` left."""

    def __init__(self, message: str, *, needed: int, remaining: int) -> None:
        super().__init__(message)
        self.needed, self.remaining = needed, remaining


@dataclass
class Meter:
    """What an oracle's answers cost. Only ``paid`` spent budget: it is the sum of the server's
    own ``charged`` figures. ``replayed``: images answered from a stored answer to a repeated
    ``request_id`` (the server charged 0); ``from_cache``: labels read from the local answer
    cache, never asked for."""

    paid: int = 0
    replayed: int = 0
    from_cache: int = 0

    def report(self, since: Meter | None = None) -> dict[str, int]:
        """The report fields ``queries_paid``, ``queries_replayed``, ``queries_from_cache``,
        counted from the ``since`` snapshot (a copy taken earlier) when one is given."""
        start = since or Meter()
        return {
            "queries_paid": self.paid - start.paid,
            "queries_replayed": self.replayed - start.replayed,
            "queries_from_cache": self.from_cache - start.from_cache,
        }

    def snapshot(self) -> Meter:
        return Meter(self.paid, self.replayed, self.from_cache)


class LabelOracle(Protocol):
    meter: Meter
    queries_remaining: int | None  # the service's last word on the budget left, if any

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (n, C, H, W) -> int64 labels (n,)."""
        ...


class ProbabilityOracle(LabelOracle, Protocol):
    def predict_probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (n, C, H, W) -> float64 class probabilities (n, classes)."""
        ...


class LocalOracle:
    """Answers from a model in this process; every image is paid for, as a service would charge.
    ``decimals`` rounds its probabilities as a ``probabilities:DECIMALS`` policy would."""

    def __init__(self, model: torch.nn.Module, *, decimals: int | None = None) -> None:
        self.model = model.eval()
        self.decimals = decimals
        self.meter = Meter()
        self.queries_remaining: int | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> LocalOracle:
        return cls(load_checkpoint(path).model)

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        self.meter.paid += len(images)
        return predict_labels(self.model, torch.from_numpy(np.ascontiguousarray(images))).numpy()

    def predict_probabilities(self, images: np.ndarray) -> np.ndarray:
        self.meter.paid += len(images)
        logits = predict_logits(self.model, torch.from_numpy(np.ascontiguousarray(images)))
        probabilities = log_probabilities(logits).exp().numpy()
        return probabilities if self.decimals is None else probabilities.round(self.decimals)


def cache_namespace(url: str, model: str, api_key: str | None) -> str:
    """The answer cache's namespace: per target and, unless ``api_key`` is None (a cache shared
    between accounts), per account, by a hash of its key (the key itself is never stored)."""
    target = f"{url.rstrip('/')}|{model}"
    if api_key is None:
        return target
    return f"{target}|account:{hashlib.sha256(api_key.encode()).hexdigest()}"


class AnswerCache:
    """Labels already bought, keyed by (namespace, image bytes), in SQLite: a re-run never pays
    twice. The namespace (``cache_namespace``) keeps one account from reusing another's labels
    unless the cache is explicitly shared."""

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

    Requests, retries (backoff on 429, 5xx and network errors) and the service's error shape are
    ``mlcore.client.ServiceClient``'s, the one client of the service API; this class maps its
    refusals onto the oracle errors and keeps the meter and the answer cache. Each batch carries a ``request_id`` derived from its content (and ``request_nonce``), so a
    retry after a lost answer (or a crash of either side) gets the stored answer back instead of
    being charged again; a client that means to pay again for the same images (a benign user
    re-sending them in a new session) gives each session its own nonce.

    The answer cache (``cache_path``) is scoped to this API key unless ``shared_cache`` is set:
    reusing labels another account paid for is a deliberate (Sybil) strategy, never a default.
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
        shared_cache: bool = False,
        request_nonce: str = "",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.url, self.model = url.rstrip("/"), model
        self.batch_size = batch_size
        self._service = ServiceClient(
            self.url,
            api_key,
            max_retries=max_retries,
            backoff=backoff,
            timeout=timeout,
            client=client,
        )
        namespace = cache_namespace(self.url, model, None if shared_cache else api_key)
        self._cache = AnswerCache(cache_path, namespace) if cache_path else None
        self._on_batch = on_batch
        self._nonce = request_nonce
        self.meter = Meter()
        self.queries_remaining: int | None = None
        self._last_used: int | None = None  # the server's queries_used in its latest charge
        self._policy: str | None = None  # the model's output policy, read once from /v1/models

    def close(self) -> None:
        self._service.close()
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
            self.meter.from_cache += len(images) - len(missing)
            if self._on_batch is not None and len(missing) < len(images):
                self._on_batch(len(images) - len(missing))
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start : start + self.batch_size]
            try:
                answer = self._labels(self._buy(images[batch]))
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

    def output_policy(self) -> str:
        """The model's output policy, as ``GET /v1/models`` tells this key (read once)."""
        if self._policy is None:
            try:
                cards = {card["name"]: card for card in self._service.models()}
            except api.ServiceError as exc:
                raise OracleUnavailable(f"cannot list the models: {exc}") from None
            if self.model not in cards:
                raise OracleRejected(
                    f"no model named {self.model!r} for this key; the service lists {sorted(cards)}"
                )
            self._policy = str(cards[self.model]["output_policy"])
        return self._policy

    def predict_probabilities(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (n, classes), float64, as rounded by the model's policy; metered
        like labels (the same content-derived request ids, so a re-run is replayed uncharged).
        Raises ProbabilitiesUnavailable before buying anything when the model's policy gives
        none; the answer cache holds labels only, so probabilities are always asked for."""
        policy = self.output_policy()
        if not policy.startswith("probabilities"):
            raise ProbabilitiesUnavailable(
                f"model {self.model} answers with the {policy!r} output policy: probabilities "
                f"need the {PROBABILITIES_POLICY!r} policy (nothing was bought)"
            )
        images = np.ascontiguousarray(images)
        rows: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            try:
                payload = self._buy(batch)
            except (BudgetExhausted, Blocked) as exc:
                exc.labels = np.full(len(images), -1, dtype=np.int64)
                raise
            if "probabilities" not in payload:
                raise ProbabilitiesUnavailable(
                    f"model {self.model} answered without probabilities (its policy changed?); "
                    f"they need the {PROBABILITIES_POLICY!r} policy"
                )
            rows.append(np.asarray(payload["probabilities"], dtype=np.float64))
            if self._on_batch is not None:
                self._on_batch(len(batch))
        return np.concatenate(rows) if rows else np.empty((0, 0), dtype=np.float64)

    def _buy(self, batch: np.ndarray) -> dict:
        request_id = hashlib.sha256(
            f"{self._nonce}{self.model}|{batch.shape}".encode() + batch.tobytes()
        ).hexdigest()[:40]
        try:
            reply = self._service.predict(self.model, batch, request_id=request_id)
        except api.BudgetExhausted as exc:
            raise BudgetExhausted(f"budget exhausted: {exc}", np.empty(0, np.int64)) from None
        except api.Blocked as exc:
            raise Blocked(f"blocked by the service: {exc}", np.empty(0, np.int64)) from None
        except api.Rejected as exc:
            raise OracleRejected(str(exc)) from None
        except api.Unavailable as exc:
            raise OracleUnavailable(str(exc)) from None
        self._settle(reply.body, len(batch), retried=reply.attempts > 1)
        return reply.body

    @staticmethod
    def _labels(payload: dict) -> np.ndarray:
        return np.asarray(payload["labels"], dtype=np.int64)

    def _settle(self, payload: dict, images: int, *, retried: bool) -> None:
        """Meter a 200 answer with the server's own figures (OracleRejected if it lacks them).

        ``charged`` is what this request cost. A replay (``charged`` 0) that answers a retry is
        the one case where the charge belongs to an answer we lost: the server charged our
        earlier attempt. Its ``queries_used`` (the meter right after that charge) tells: above
        the last figure this oracle saw, the charge happened during this run, so it is paid;
        otherwise an earlier run paid it and it is a replay.
        """
        try:
            charged, used, _labels = (
                int(payload["charged"]),
                int(payload["queries_used"]),
                payload["labels"],
            )
        except (KeyError, TypeError, ValueError):
            raise OracleRejected(
                "the service's answer lacks the charged / queries_used / labels figures: "
                f"{str(payload)[:200]}"
            ) from None
        lost_answer = (
            charged == 0 and retried and (self._last_used is None or used > self._last_used)
        )
        if lost_answer:
            charged = images
        self.meter.paid += charged
        self.meter.replayed += images - charged
        if charged:
            self._last_used = max(used, self._last_used or 0)
            self.queries_remaining = payload.get("queries_remaining")


@dataclass
class Purchase:
    """What ``buy`` got: one label per image (-1 where none was bought) and what stopped it."""

    labels: np.ndarray
    stopped_by: Literal["budget", "blocked"] | None = None
    message: str | None = None

    @property
    def bought(self) -> np.ndarray:
        return self.labels >= 0


def buy(oracle: LabelOracle, images: np.ndarray) -> Purchase:
    """Labels for ``images``, the budget/stop behaviour of every attack: a 402 or 403 never
    loses a label already bought; after a 402 what is left of the budget is spent on the first
    images still unlabelled; then the purchase stops and says why (``stopped_by``)."""
    labels, problem = _ask(oracle, images)
    if isinstance(problem, BudgetExhausted):
        problem = _spend_the_rest(oracle, images, labels) or problem
    if problem is None:
        return Purchase(labels)
    stopped_by: Literal["budget", "blocked"] = (
        "budget" if isinstance(problem, BudgetExhausted) else "blocked"
    )
    logger.warning(
        "%s: stopped with %d of %d labels", problem, int((labels >= 0).sum()), len(images)
    )
    return Purchase(labels, stopped_by, str(problem))


def _ask(oracle: LabelOracle, images: np.ndarray) -> tuple[np.ndarray, OracleError | None]:
    """Labels for ``images`` (-1 where none was bought) and the 402/403 that stopped it, if any."""
    try:
        return np.asarray(oracle.predict_labels(images), dtype=np.int64), None
    except (BudgetExhausted, Blocked) as exc:
        labels = np.full(len(images), -1, dtype=np.int64)
        got = np.asarray(exc.labels, dtype=np.int64)[: len(images)]
        labels[: len(got)] = got
        return labels, exc


def _spend_the_rest(
    oracle: LabelOracle, images: np.ndarray, labels: np.ndarray
) -> OracleError | None:
    """After a 402 on ``images``, buy labels (in place) for as many of them, first ones first,
    as the budget still pays for. The service refuses a whole batch it cannot pay for and a
    refusal costs nothing, so: ask for what the oracle says is left, or halve until one fits."""
    todo = np.flatnonzero(labels < 0)
    size = len(todo) // 2
    while len(todo) and size >= 1:
        left = oracle.queries_remaining
        if isinstance(left, int) and not isinstance(left, bool):
            if left <= 0:
                break
            size = min(size, left)
        labels[todo[:size]], problem = _ask(oracle, images[todo[:size]])
        todo = np.flatnonzero(labels < 0)
        if isinstance(problem, Blocked):
            return problem
        if problem is not None:
            size //= 2
    return None
