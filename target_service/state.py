"""Durable service state in SQLite (WAL): clients, the ledger, idempotency records, alarms.

Everything that spends budget happens in one transaction: the conditional UPDATE that charges
(``used + n <= budget``, so concurrent requests can never overspend), the ledger row and the
stored answer for the request_id. So a charged request always has its answer on disk, and a
retried request_id gets that answer back without paying again. ``synchronous=NORMAL`` in WAL
mode survives a killed process (not a power cut), which is the failure the range simulates.

``StateStore`` is the one interface the service uses, so it can later be swapped for a
PostgreSQL or Redis implementation when the service scales out.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
CREATE TABLE IF NOT EXISTS detector_state (
    client_id   TEXT NOT NULL,
    model       TEXT NOT NULL,
    detector    TEXT NOT NULL,
    state       BLOB NOT NULL,
    PRIMARY KEY (client_id, model, detector)
);
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
    """What a charged request returns: its stored answer and the usage after it."""

    response: dict[str, Any]
    replayed: bool


class StateStore:
    """SQLite-backed state. One connection, serialised by a lock: SQLite has a single writer
    anyway, and the lock keeps each transaction whole across the server's worker threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
            raise NotFound(f"no client with id {client_id!r}", code="unknown_client")
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
            raise NotFound(f"no client with id {client_id!r}", code="unknown_client")
        return self.get_client(client_id)

    # -- charging ----------------------------------------------------------------------------
    def replay(self, client_id: str, request_id: str, fingerprint: str) -> dict[str, Any] | None:
        """The stored answer of an already charged request_id, or None if it is new."""
        with self._lock:
            row = self._db.execute(
                "SELECT fingerprint, response FROM idempotency WHERE client_id = ? AND request_id = ?",
                (client_id, request_id),
            ).fetchone()
        if row is None:
            return None
        if row["fingerprint"] != fingerprint:
            raise Conflict(
                f"request_id {request_id!r} was already used for a different request",
                code="request_id_reused",
            )
        return json.loads(row["response"])

    def charge(
        self,
        client_id: str,
        *,
        model: str,
        images: int,
        request_id: str | None,
        fingerprint: str,
        response: dict[str, Any],
    ) -> Charge:
        """Atomically charge ``images`` queries and record the answer, or raise BudgetExhausted.

        ``response`` gets ``queries_used`` / ``queries_remaining`` filled in from the charge.
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
                                f"request_id {request_id!r} was already used for a different request",
                                code="request_id_reused",
                            )
                        return Charge(json.loads(stored["response"]), replayed=True)
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
                    "queries_used": row["used"],
                    "queries_remaining": row["budget"] - row["used"],
                }
                self._db.execute(
                    "INSERT INTO ledger (client_id, model, request_id, images, created_at) VALUES (?,?,?,?,?)",
                    (client_id, model, request_id, images, now),
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
        return Charge(response, replayed=False)

    def _refuse(self, client_id: str, images: int) -> Charge:
        row = self._db.execute("SELECT * FROM clients WHERE client_id = ?", (client_id,)).fetchone()
        if row is None or row["revoked"]:
            raise Unauthorized("this API key has been revoked", code="revoked_api_key")
        remaining = row["budget"] - row["used"]
        raise BudgetExhausted(
            f"a batch of {images} image(s) does not fit the remaining budget of {remaining} queries"
        )

    def ledger_total(self, client_id: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(images), 0) AS total FROM ledger WHERE client_id = ?",
                (client_id,),
            ).fetchone()
        return int(row["total"])


def _client(row: sqlite3.Row) -> Client:
    return Client(
        row["client_id"],
        row["name"],
        row["budget"],
        row["used"],
        bool(row["revoked"]),
        row["created_at"],
    )
