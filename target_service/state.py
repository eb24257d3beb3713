"""Durable service state in SQLite (WAL): clients, the ledger, idempotency records, alarms.

Everything that spends budget happens in one transaction: the conditional UPDATE that charges
(``used + n <= budget``, so concurrent requests can never overspend), the ledger row and the
stored answer for the request_id, and (for watched models) the images and labels in the
``query_log`` that detectors are rebuilt from. So a charged request always has its answer on disk, and a
retried request_id gets that answer back without paying again. ``synchronous=NORMAL`` in WAL
mode survives a killed process (not a power cut), which is the failure the range simulates.

``StateStore`` is the one interface the service uses, so it can later be swapped for a
PostgreSQL or Redis implementation when the service scales out.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlcore.wire import echo
from target_service.errors import BudgetExhausted, Conflict, NotFound, Unauthorized

SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    client_id   TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    key_hash    TEXT NOT NULL UNIQUE,
    budget      INTEGER NOT NULL CHECK (budget >= 0),
    used        INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0 AND used <= budget),
    revoked     INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    entry_id    INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id   TEXT NOT NULL REFERENCES clients(client_id),
    model       TEXT NOT NULL,
    request_id  TEXT,
    images      INTEGER NOT NULL,
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_client ON ledger(client_id);
CREATE TABLE IF NOT EXISTS idempotency (
    client_id   TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    response    TEXT NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (client_id, request_id)
);
CREATE TABLE IF NOT EXISTS query_log (
    entry_id    INTEGER PRIMARY KEY REFERENCES ledger(entry_id),
    client_id   TEXT NOT NULL,
    model       TEXT NOT NULL,
    dtype       TEXT NOT NULL,
    shape       TEXT NOT NULL,
    images      BLOB NOT NULL,
    labels      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS query_log_stream ON query_log(client_id, model, entry_id);
CREATE TABLE IF NOT EXISTS alarms (
    client_id   TEXT NOT NULL,
    model       TEXT NOT NULL,
    detector    TEXT NOT NULL,
    query_index INTEGER NOT NULL,
    statistic   REAL,
    threshold   REAL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (client_id, model, detector)
);
CREATE TABLE IF NOT EXISTS detector_errors (
    client_id   TEXT NOT NULL,
    model       TEXT NOT NULL,
    detector    TEXT NOT NULL,
    query_index INTEGER NOT NULL,
    message     TEXT NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (client_id, model, detector)
);
"""


def hash_api_key(api_key: str) -> str:
    """Keys are 256-bit random tokens, so one SHA-256 is enough (no password stretching)."""
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class Client:
    client_id: str
    name: str
    budget: int
    used: int
    revoked: bool
    created_at: float

    @property
    def remaining(self) -> int:
        return self.budget - self.used


@dataclass(frozen=True)
class Charge:
    """What a charged request returns: its stored answer (usage included) and its ledger entry
    (None when the answer was replayed from an earlier charge)."""

    response: dict[str, Any]
    replayed: bool
    entry_id: int | None = None


class StateStore:
    """SQLite-backed state. One connection, serialised by a lock: SQLite has a single writer
    anyway, and the lock keeps each transaction whole across the server's worker threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # owner-only before SQLite opens it: SQLite creates the -wal and -shm files with the
        # database file's permissions
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- clients -----------------------------------------------------------------------------
    def create_client(self, name: str, budget: int) -> tuple[Client, str]:
        """Returns the client and its API key; only the key's hash is stored."""
        api_key = "mlr_" + secrets.token_urlsafe(32)
        client = Client(uuid.uuid4().hex[:16], name, budget, 0, False, time.time())
        with self._lock:
            self._db.execute(
                "INSERT INTO clients (client_id, name, key_hash, budget, created_at) VALUES (?,?,?,?,?)",
                (client.client_id, name, hash_api_key(api_key), budget, client.created_at),
            )
        return client, api_key

    def authenticate(self, api_key: str) -> Client:
        digest = hash_api_key(api_key)
        with self._lock:
            row = self._db.execute("SELECT * FROM clients WHERE key_hash = ?", (digest,)).fetchone()
        if row is None or not hmac.compare_digest(row["key_hash"], digest):
            raise Unauthorized("unknown API key", code="unknown_api_key")
        if row["revoked"]:
            raise Unauthorized("this API key has been revoked", code="revoked_api_key")
        return _client(row)

    def get_client(self, client_id: str) -> Client:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM clients WHERE client_id = ?", (client_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"no client with id {echo(client_id)}", code="unknown_client")
        return _client(row)

    def list_clients(self) -> list[Client]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM clients ORDER BY created_at").fetchall()
        return [_client(row) for row in rows]

    def revoke_client(self, client_id: str) -> Client:
        with self._lock:
            cursor = self._db.execute(
                "UPDATE clients SET revoked = 1 WHERE client_id = ?", (client_id,)
            )
        if cursor.rowcount == 0:
            raise NotFound(f"no client with id {echo(client_id)}", code="unknown_client")
        return self.get_client(client_id)

    # -- charging ----------------------------------------------------------------------------
    def replay(self, client_id: str, request_id: str, fingerprint: str) -> dict[str, Any] | None:
        """The stored answer of an already charged request_id (``charged`` 0: this request
        costs nothing), or None if it is new."""
        with self._lock:
            row = self._db.execute(
                "SELECT fingerprint, response FROM idempotency WHERE client_id = ? AND request_id = ?",
                (client_id, request_id),
            ).fetchone()
        if row is None:
            return None
        if row["fingerprint"] != fingerprint:
            raise Conflict(
                f"request_id {echo(request_id)} was already used for a different request",
                code="request_id_reused",
            )
        return _replayed(row["response"])

    def charge(
        self,
        client_id: str,
        *,
        model: str,
        images: int,
        request_id: str | None,
        fingerprint: str,
        response: dict[str, Any],
        observation: np.ndarray | None = None,
    ) -> Charge:
        """Atomically charge ``images`` queries and record the answer, or raise BudgetExhausted.

        ``response`` gets ``charged`` / ``queries_used`` / ``queries_remaining`` filled in from
        the charge (a replay of it says ``charged: 0``).
        ``observation`` (the request's images) goes into the query log with the answered labels.
        """
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if request_id is not None:
                    stored = self._db.execute(
                        "SELECT fingerprint, response FROM idempotency"
                        " WHERE client_id = ? AND request_id = ?",
                        (client_id, request_id),
                    ).fetchone()
                    if stored is not None:  # a concurrent duplicate won the race: replay it
                        self._db.execute("ROLLBACK")
                        if stored["fingerprint"] != fingerprint:
                            raise Conflict(
                                f"request_id {echo(request_id)} was already used for a different request",
                                code="request_id_reused",
                            )
                        return Charge(_replayed(stored["response"]), replayed=True)
                row = self._db.execute(
                    "UPDATE clients SET used = used + ? WHERE client_id = ? AND revoked = 0"
                    " AND used + ? <= budget RETURNING used, budget",
                    (images, client_id, images),
                ).fetchone()
                if row is None:
                    self._db.execute("ROLLBACK")
                    return self._refuse(client_id, images)
                response = {
                    **response,
                    "charged": images,
                    "queries_used": row["used"],
                    "queries_remaining": row["budget"] - row["used"],
                }
                entry_id = self._db.execute(
                    "INSERT INTO ledger (client_id, model, request_id, images, created_at) VALUES (?,?,?,?,?)",
                    (client_id, model, request_id, images, now),
                ).lastrowid
                if observation is not None:
                    self._db.execute(
                        "INSERT INTO query_log VALUES (?,?,?,?,?,?,?)",
                        (
                            entry_id,
                            client_id,
                            model,
                            observation.dtype.str,
                            json.dumps(observation.shape),
                            np.ascontiguousarray(observation).tobytes(),
                            json.dumps(response["labels"]),
                        ),
                    )
                if request_id is not None:
                    self._db.execute(
                        "INSERT INTO idempotency VALUES (?,?,?,?,?)",
                        (client_id, request_id, fingerprint, json.dumps(response), now),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return Charge(response, replayed=False, entry_id=entry_id)

    def _refuse(self, client_id: str, images: int) -> Charge:
        row = self._db.execute("SELECT * FROM clients WHERE client_id = ?", (client_id,)).fetchone()
        if row is None or row["revoked"]:
            raise Unauthorized("this API key has been revoked", code="revoked_api_key")
        remaining = row["budget"] - row["used"]
        raise BudgetExhausted(
            f"a batch of {images} image(s) does not fit the remaining budget of {remaining} queries"
        )

    # -- detectors ---------------------------------------------------------------------------
    def query_log(
        self, client_id: str, model: str, *, after: int = 0
    ) -> Iterator[tuple[int, np.ndarray, list[int]]]:
        """(entry_id, images, labels) of one stream's charged requests after ``after``, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT entry_id, dtype, shape, images, labels FROM query_log"
                " WHERE client_id = ? AND model = ? AND entry_id > ? ORDER BY entry_id",
                (client_id, model, after),
            ).fetchall()
        for row in rows:
            images = np.frombuffer(row["images"], dtype=np.dtype(row["dtype"])).reshape(
                json.loads(row["shape"])
            )
            yield row["entry_id"], images, json.loads(row["labels"])

    def record_alarm(
        self,
        client_id: str,
        *,
        model: str,
        detector: str,
        query_index: int,
        statistic: float | None,
        threshold: float,
    ) -> None:
        """Keep a detector's first alarm on this stream (later ones do not overwrite it)."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO alarms VALUES (?,?,?,?,?,?,?)",
                (client_id, model, detector, query_index, statistic, threshold, time.time()),
            )

    def list_alarms(self, client_id: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT a.*, c.name AS client_name FROM alarms a JOIN clients c USING (client_id)"
        params: tuple = ()
        if client_id is not None:
            query, params = query + " WHERE a.client_id = ?", (client_id,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY a.created_at", params).fetchall()
        return [dict(row) for row in rows]

    def record_detector_error(
        self, client_id: str, *, model: str, detector: str, query_index: int, message: str
    ) -> None:
        """Keep a detector's failure on this stream until ``clear_detector_error``: where and
        when it first failed, and the latest message (a failed rebuild updates only that)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO detector_errors VALUES (?,?,?,?,?,?) ON CONFLICT"
                " (client_id, model, detector) DO UPDATE SET message = excluded.message",
                (client_id, model, detector, query_index, message, time.time()),
            )

    def clear_detector_error(self, client_id: str, *, model: str, detector: str) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM detector_errors WHERE client_id = ? AND model = ? AND detector = ?",
                (client_id, model, detector),
            )

    def list_detector_errors(self) -> list[dict[str, Any]]:
        """Every detector currently in error, with its client's name, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT e.*, c.name AS client_name FROM detector_errors e"
                " JOIN clients c USING (client_id) ORDER BY e.created_at"
            ).fetchall()
        return [dict(row) for row in rows]

    def models_queried(self, client_id: str) -> list[str]:
        """The models this client has been charged on, most queries first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT model FROM ledger WHERE client_id = ? GROUP BY model ORDER BY SUM(images) DESC",
                (client_id,),
            ).fetchall()
        return [row["model"] for row in rows]

    def ledger_total(self, client_id: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(images), 0) AS total FROM ledger WHERE client_id = ?",
                (client_id,),
            ).fetchone()
        return int(row["total"])


def _replayed(stored: str) -> dict[str, Any]:
    """A stored answer as its replay: the same labels and meter, and nothing charged for it."""
    return {**json.loads(stored), "charged": 0}


def _client(row: sqlite3.Row) -> Client:
    return Client(
        row["client_id"],
        row["name"],
        row["budget"],
        row["used"],
        bool(row["revoked"]),
        row["created_at"],
    )
