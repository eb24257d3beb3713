"""Durable service state in SQLite (WAL, the embedded default) or PostgreSQL
(``TARGET_DATABASE_URL``): clients, the ledger, idempotency records, alarms, jobs.

Everything that spends budget happens in one transaction: the request_id's idempotency record
(``INSERT ... ON CONFLICT DO NOTHING``, first, so a concurrent duplicate waits for this charge
and then replays it), the conditional UPDATE that charges (``used + n <= budget``, so
concurrent requests and replicas can never overspend), the ledger row, the stored answer, and
(for watched models) the images and labels in the ``query_log`` that detectors are rebuilt
from. So a charged request always has its answer on disk, and a retried request_id gets that
answer back without paying again. ``synchronous=NORMAL`` in WAL mode survives a killed process
(not a power cut), which is the failure the range simulates.

One copy of the SQL for both databases: ``SQLStore`` holds every query, written once in the SQL
both dialects accept (``?`` placeholders, ``ON CONFLICT``, ``RETURNING``), and runs it through a
``state_db.Database`` adapter that maps placeholders, pools connections and runs transactions.
A new method written on ``SQLStore`` with ``self._db.execute(...)`` (inside ``with
self._transaction():`` when its statements must commit together) works on both; add it to the
``StateStore`` protocol too. ``SQLiteStore(path)`` and ``PostgresStore(url)`` only choose the
adapter; ``open_store(settings)`` picks one. The schema is versioned: ``MIGRATIONS`` are
numbered steps applied in order at start (recorded in ``schema_migrations``), written once with
``{ID}`` / ``{BLOB}`` / ``{FLOAT}`` for the column types the dialects spell differently.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, cast

import numpy as np

from mlcore.wire import echo
from target_service.errors import (
    BudgetExhausted,
    Conflict,
    NotFound,
    QuotaExceeded,
    StateUnavailable,
    Unauthorized,
)
from target_service.state_db import Database, PostgresDatabase, Row, SQLiteDatabase
from target_service.training_jobs import FINAL, sources

if TYPE_CHECKING:
    from target_service.settings import Settings

# The schema as it was before migrations existed: a state file of that time has all of it.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS clients (
    client_id   TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    key_hash    TEXT NOT NULL UNIQUE,
    budget      INTEGER NOT NULL CHECK (budget >= 0),
    used        INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0 AND used <= budget),
    revoked     INTEGER NOT NULL DEFAULT 0,
    created_at  {FLOAT} NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    entry_id    {ID},
    client_id   TEXT NOT NULL REFERENCES clients(client_id),
    model       TEXT NOT NULL,
    request_id  TEXT,
    images      INTEGER NOT NULL,
    created_at  {FLOAT} NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_client ON ledger(client_id);
CREATE TABLE IF NOT EXISTS idempotency (
    client_id   TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    response    TEXT NOT NULL,
    created_at  {FLOAT} NOT NULL,
    PRIMARY KEY (client_id, request_id)
);
CREATE TABLE IF NOT EXISTS query_log (
    entry_id    INTEGER PRIMARY KEY REFERENCES ledger(entry_id),
    client_id   TEXT NOT NULL,
    model       TEXT NOT NULL,
    dtype       TEXT NOT NULL,
    shape       TEXT NOT NULL,
    images      {BLOB} NOT NULL,
    labels      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS query_log_stream ON query_log(client_id, model, entry_id);
CREATE TABLE IF NOT EXISTS alarms (
    client_id   TEXT NOT NULL,
    model       TEXT NOT NULL,
    detector    TEXT NOT NULL,
    query_index INTEGER NOT NULL,
    statistic   {FLOAT},
    threshold   {FLOAT},
    created_at  {FLOAT} NOT NULL,
    PRIMARY KEY (client_id, model, detector)
);
CREATE TABLE IF NOT EXISTS input_screening (
    entry_id    INTEGER PRIMARY KEY REFERENCES ledger(entry_id),
    client_id   TEXT NOT NULL,
    model       TEXT NOT NULL,
    images      INTEGER NOT NULL,
    flagged     INTEGER NOT NULL,
    rejected    INTEGER NOT NULL,
    scores      TEXT NOT NULL,
    flags       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS input_screening_stream ON input_screening(client_id, model, entry_id);
CREATE TABLE IF NOT EXISTS detector_errors (
    client_id   TEXT NOT NULL,
    model       TEXT NOT NULL,
    detector    TEXT NOT NULL,
    query_index INTEGER NOT NULL,
    message     TEXT NOT NULL,
    created_at  {FLOAT} NOT NULL,
    PRIMARY KEY (client_id, model, detector)
);
CREATE TABLE IF NOT EXISTS training_quotas (
    client_id   TEXT PRIMARY KEY REFERENCES clients(client_id),
    quota       INTEGER NOT NULL CHECK (quota >= 0),
    used        INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0 AND used <= quota)
);
CREATE TABLE IF NOT EXISTS training_ledger (
    entry_id     {ID},
    client_id    TEXT NOT NULL REFERENCES clients(client_id),
    job_id       TEXT NOT NULL,
    image_epochs INTEGER NOT NULL,
    reason       TEXT NOT NULL,
    created_at   {FLOAT} NOT NULL
);
CREATE TABLE IF NOT EXISTS datasets (
    dataset_id  TEXT PRIMARY KEY,
    client_id   TEXT NOT NULL REFERENCES clients(client_id),
    name        TEXT NOT NULL,
    n           INTEGER NOT NULL,
    shape       TEXT NOT NULL,
    dtype       TEXT NOT NULL,
    classes     INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    bytes       INTEGER NOT NULL,
    created_at  {FLOAT} NOT NULL
);
CREATE TABLE IF NOT EXISTS training_jobs (
    job_id          TEXT PRIMARY KEY,
    client_id       TEXT NOT NULL REFERENCES clients(client_id),
    dataset_id      TEXT NOT NULL,
    spec            TEXT NOT NULL,
    model           TEXT NOT NULL,
    publish         TEXT NOT NULL,
    status          TEXT NOT NULL,
    epochs          INTEGER NOT NULL,
    train_images    INTEGER NOT NULL,
    epoch           INTEGER NOT NULL DEFAULT 0,
    loss            {FLOAT},
    train_accuracy  {FLOAT},
    metrics         TEXT,
    error           TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    claim_token     TEXT,
    lease_until     {FLOAT},
    created_at      {FLOAT} NOT NULL,
    started_at      {FLOAT},
    finished_at     {FLOAT}
);
CREATE INDEX IF NOT EXISTS training_jobs_status ON training_jobs(status, created_at);
CREATE INDEX IF NOT EXISTS training_jobs_model ON training_jobs(model);
CREATE TABLE IF NOT EXISTS training_epochs (
    job_id          TEXT NOT NULL,
    epoch           INTEGER NOT NULL,
    attempt         INTEGER NOT NULL,
    loss            {FLOAT} NOT NULL,
    train_accuracy  {FLOAT} NOT NULL,
    created_at      {FLOAT} NOT NULL,
    PRIMARY KEY (job_id, epoch)
);
CREATE TABLE IF NOT EXISTS membership_challenges (
    challenge_id     TEXT PRIMARY KEY,
    client_id        TEXT NOT NULL REFERENCES clients(client_id),
    model            TEXT NOT NULL,
    n                INTEGER NOT NULL,
    seed             INTEGER NOT NULL,
    members_from     TEXT NOT NULL,
    non_members_from TEXT NOT NULL,
    candidates       TEXT NOT NULL,  -- JSON [[is_member, index], ...]: the ground truth, never sent
    created_at       {FLOAT} NOT NULL,
    submitted_at     {FLOAT},
    result           TEXT
);
"""

# -- detection off the request path and cross-client groups (target_service/detect_worker.py) ---
# Plain portable SQL (``?`` placeholders, ``INSERT ... ON CONFLICT``), kept together so that it
# ports as one block to every StateStore backend.
ORG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # also a folder name (detector snapshots)
DETECTION_SCHEMA = """
CREATE TABLE IF NOT EXISTS client_orgs (
    client_id   TEXT PRIMARY KEY REFERENCES clients(client_id),
    org         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS client_orgs_org ON client_orgs(org);
CREATE INDEX IF NOT EXISTS query_log_model ON query_log(model, entry_id);
CREATE TABLE IF NOT EXISTS detection_leases (
    stream        TEXT NOT NULL,               -- a client id, 'org:<org>' or 'all'
    model         TEXT NOT NULL,
    owner         TEXT,                        -- the detection worker's token; NULL: free
    lease_until   {FLOAT},
    through_entry INTEGER NOT NULL DEFAULT 0,  -- the last query_log entry its detectors saw
    PRIMARY KEY (stream, model)
);
CREATE TABLE IF NOT EXISTS group_alarms (
    stream      TEXT NOT NULL,                 -- 'org:<org>' or 'all'
    model       TEXT NOT NULL,
    detector    TEXT NOT NULL,
    query_index INTEGER NOT NULL,              -- 1-based, in the group's union of queries
    client_id   TEXT NOT NULL,                 -- whose query raised it
    statistic   {FLOAT},
    threshold   {FLOAT},
    created_at  {FLOAT} NOT NULL,
    PRIMARY KEY (stream, model, detector)
);
"""
# PostgreSQL's INTEGER is 4 bytes, SQLite's 8: budgets, quotas, query counters and challenge seeds
# the API accepts (up to 10**12 queries, 10**15 image-epochs, seeds below 2**32) need BIGINT there.
WIDEN_COUNTERS = """
ALTER TABLE clients ALTER COLUMN budget TYPE BIGINT, ALTER COLUMN used TYPE BIGINT;
ALTER TABLE query_log ALTER COLUMN entry_id TYPE BIGINT;
ALTER TABLE alarms ALTER COLUMN query_index TYPE BIGINT;
ALTER TABLE input_screening ALTER COLUMN entry_id TYPE BIGINT;
ALTER TABLE detector_errors ALTER COLUMN query_index TYPE BIGINT;
ALTER TABLE training_quotas ALTER COLUMN quota TYPE BIGINT, ALTER COLUMN used TYPE BIGINT;
ALTER TABLE training_ledger ALTER COLUMN image_epochs TYPE BIGINT;
ALTER TABLE detection_leases ALTER COLUMN through_entry TYPE BIGINT;
ALTER TABLE group_alarms ALTER COLUMN query_index TYPE BIGINT;
ALTER TABLE membership_challenges ALTER COLUMN seed TYPE BIGINT;
"""
# (version, what it does, SQL or SQL per dialect): applied in order, each once, in one transaction
# at start. A dialect missing from a per-dialect entry has nothing to do for that version.
MIGRATIONS: list[tuple[int, str, str | dict[str, str]]] = [
    (
        1,
        "clients, ledger, idempotency, query log, alarms, training, datasets, challenges",
        SCHEMA_V1,
    ),
    (
        2,
        "detection off the request path: client orgs, detection leases, group alarms",
        DETECTION_SCHEMA,
    ),
    (
        3,
        "64-bit budgets, quotas, query counters and challenge seeds",
        {"postgresql": WIDEN_COUNTERS},
    ),
]


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
class Screening:
    """What a model's input defence said about one charged request: each image's score (e.g.
    KL divergence), whether it was flagged, and how many images it rejected (unanswered)."""

    scores: list[float]
    flags: list[bool]
    rejected: int


@dataclass(frozen=True)
class Charge:
    """What a charged request returns: its stored answer (usage included) and its ledger entry
    (None when the answer was replayed from an earlier charge)."""

    response: dict[str, Any]
    replayed: bool
    entry_id: int | None = None


class StateStore(Protocol):
    """What the service needs from its state, whatever the database: ``SQLStore`` (SQLite or
    PostgreSQL) implements it. Each method's docstring is on ``SQLStore``."""

    @property
    def location(self) -> str: ...

    def schema_version(self) -> int: ...

    def close(self) -> None: ...

    def create_client(
        self, name: str, budget: int, *, training_quota: int = 0, org: str | None = None
    ) -> tuple[Client, str]: ...

    def authenticate(self, api_key: str) -> Client: ...

    def get_client(self, client_id: str) -> Client: ...

    def list_clients(self) -> list[Client]: ...

    def revoke_client(self, client_id: str) -> Client: ...

    def replay(
        self, client_id: str, request_id: str, fingerprint: str
    ) -> dict[str, Any] | None: ...

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
        observed_labels: list[int] | None = None,
        screening: Screening | None = None,
    ) -> Charge: ...

    def query_log(
        self, client_id: str, model: str, *, after: int = 0
    ) -> Iterator[tuple[int, np.ndarray, list[int]]]: ...

    def screening_log(
        self, client_id: str, model: str, *, after: int = 0
    ) -> Iterator[tuple[int, Screening]]: ...

    def record_alarm(
        self,
        client_id: str,
        *,
        model: str,
        detector: str,
        query_index: int,
        statistic: float | None,
        threshold: float,
    ) -> None: ...

    def list_alarms(self, client_id: str | None = None) -> list[dict[str, Any]]: ...

    def record_detector_error(
        self, client_id: str, *, model: str, detector: str, query_index: int, message: str
    ) -> None: ...

    def clear_detector_error(self, client_id: str, *, model: str, detector: str) -> None: ...

    def list_detector_errors(self) -> list[dict[str, Any]]: ...

    def models_queried(self, client_id: str) -> list[str]: ...

    def ledger_total(self, client_id: str) -> int: ...

    def training_usage(self, client_id: str) -> tuple[int, int]: ...

    def training_ledger(self, client_id: str) -> list[dict[str, Any]]: ...

    def add_dataset(self, row: dict[str, Any]) -> None: ...

    def get_dataset(self, dataset_id: str, client_id: str | None = None) -> dict[str, Any]: ...

    def list_datasets(self, client_id: str | None = None) -> list[dict[str, Any]]: ...

    def delete_dataset(self, dataset_id: str, client_id: str | None = None) -> dict[str, Any]: ...

    def submit_job(self, job: dict[str, Any], *, test_dataset_id: str | None) -> dict[str, Any]: ...

    def get_job(self, job_id: str, client_id: str | None = None) -> dict[str, Any]: ...

    def list_jobs(self, client_id: str | None = None) -> list[dict[str, Any]]: ...

    def cancel_job(self, job_id: str, client_id: str | None = None) -> dict[str, Any]: ...

    def claim_job(self, token: str, *, lease_seconds: float) -> dict[str, Any] | None: ...

    def renew_lease(self, job_id: str, token: str, *, lease_seconds: float) -> bool: ...

    def record_epoch(
        self, job_id: str, token: str, *, epoch: int, loss: float, train_accuracy: float
    ) -> bool: ...

    def finish_job(
        self,
        job_id: str,
        token: str,
        *,
        status: str,
        metrics: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> bool: ...

    def epoch_log(self, job_id: str) -> list[dict[str, Any]]: ...

    def hosted_jobs(self) -> list[dict[str, Any]]: ...

    def hosted_job(self, model: str) -> dict[str, Any] | None: ...

    def unfinished_jobs(self) -> int: ...

    def add_membership_challenge(self, row: dict[str, Any]) -> None: ...

    def get_membership_challenge(
        self, challenge_id: str, client_id: str | None = None
    ) -> dict[str, Any]: ...

    def list_membership_challenges(self) -> list[dict[str, Any]]: ...

    def record_membership_result(self, challenge_id: str, result: dict[str, Any]) -> None: ...

    def client_orgs(self) -> dict[str, str]: ...

    def detection_streams(self, groups: str, *, after: int = 0) -> list[tuple[str, str, int]]: ...

    def detection_log(
        self, model: str, *, after: int, client_id: str | None = None, org: str | None = None
    ) -> Iterator[tuple[int, str, np.ndarray, list[int]]]: ...

    def detection_leases(self) -> list[dict[str, Any]]: ...

    def claim_detection_stream(
        self, stream: str, model: str, owner: str, *, lease_seconds: float
    ) -> int | None: ...

    def renew_detection_leases(
        self, owner: str, *, lease_seconds: float
    ) -> set[tuple[str, str]]: ...

    def advance_detection_stream(
        self, stream: str, model: str, owner: str, *, through_entry: int,
        alarms: list[dict[str, Any]],
    ) -> bool: ...  # fmt: skip

    def release_detection_leases(self, owner: str) -> None: ...

    def alarm_blocks(self, client_id: str, model: str, detectors: list[str]) -> bool: ...

    def list_group_alarms(self) -> list[dict[str, Any]]: ...


class SQLStore:
    """Every state query, once, over a ``Database`` adapter (SQLite or PostgreSQL).

    Opening one applies the migrations the database lacks. Methods are safe to call from many
    threads, and many stores (processes, replicas) may share one PostgreSQL database.
    """

    def __init__(self, database: Database) -> None:
        self._db = database
        try:
            self._migrate()
        except BaseException:
            database.close()
            raise

    def _migrate(self) -> None:
        with self._transaction():
            self._db.lock_schema()
            self._db.script(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                " name TEXT NOT NULL, applied_at {FLOAT} NOT NULL)"
            )
            rows = self._db.execute("SELECT version FROM schema_migrations").fetchall()
            applied = {int(row["version"]) for row in rows}
            newest = MIGRATIONS[-1][0]
            if applied and max(applied) > newest:
                raise StateUnavailable(
                    f"the state database is at schema version {max(applied)}, newer than this "
                    f"service knows ({newest}): run a newer service"
                )
            for version, name, sql in MIGRATIONS:
                if version not in applied:
                    if isinstance(sql, dict):
                        sql = sql.get(self._db.dialect, "")
                    if sql:
                        self._db.script(sql)
                    self._db.execute(
                        "INSERT INTO schema_migrations VALUES (?,?,?)", (version, name, time.time())
                    )

    @property
    def location(self) -> str:
        """Where the state lives, for logs: a file path, or a URL without its password."""
        return self._db.location

    def schema_version(self) -> int:
        row = self._db.execute("SELECT MAX(version) AS version FROM schema_migrations").fetchone()
        return int(row["version"])

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> AbstractContextManager[None]:
        """One write transaction (joined, if this thread is already in one)."""
        return self._db.transaction()

    # -- clients -----------------------------------------------------------------------------
    def create_client(
        self, name: str, budget: int, *, training_quota: int = 0, org: str | None = None
    ) -> tuple[Client, str]:
        """Returns the client and its API key; only the key's hash is stored.
        ``training_quota`` is in image-epochs (0: the client may not train); ``org`` (checked
        against ``ORG_PATTERN`` by the caller) groups clients for cross-client detection."""
        api_key = "mlr_" + secrets.token_urlsafe(32)
        client = Client(uuid.uuid4().hex[:16], name, budget, 0, False, time.time())
        with self._transaction():
            self._db.execute(
                "INSERT INTO clients (client_id, name, key_hash, budget, created_at) VALUES (?,?,?,?,?)",
                (client.client_id, name, hash_api_key(api_key), budget, client.created_at),
            )
            self._db.execute(
                "INSERT INTO training_quotas (client_id, quota) VALUES (?,?)",
                (client.client_id, training_quota),
            )
            if org is not None:
                self._db.execute(
                    "INSERT INTO client_orgs (client_id, org) VALUES (?,?)", (client.client_id, org)
                )
        return client, api_key

    def authenticate(self, api_key: str) -> Client:
        digest = hash_api_key(api_key)
        row = self._db.execute("SELECT * FROM clients WHERE key_hash = ?", (digest,)).fetchone()
        if row is None or not hmac.compare_digest(row["key_hash"], digest):
            raise Unauthorized("unknown API key", code="unknown_api_key")
        if row["revoked"]:
            raise Unauthorized("this API key has been revoked", code="revoked_api_key")
        return _client(row)

    def get_client(self, client_id: str) -> Client:
        row = self._db.execute("SELECT * FROM clients WHERE client_id = ?", (client_id,)).fetchone()
        if row is None:
            raise NotFound(f"no client with id {echo(client_id)}", code="unknown_client")
        return _client(row)

    def list_clients(self) -> list[Client]:
        rows = self._db.execute("SELECT * FROM clients ORDER BY created_at").fetchall()
        return [_client(row) for row in rows]

    def revoke_client(self, client_id: str) -> Client:
        cursor = self._db.execute(
            "UPDATE clients SET revoked = 1 WHERE client_id = ?", (client_id,)
        )
        if cursor.rowcount == 0:
            raise NotFound(f"no client with id {echo(client_id)}", code="unknown_client")
        return self.get_client(client_id)

    # -- charging ----------------------------------------------------------------------------
    def replay(self, client_id: str, request_id: str, fingerprint: str) -> dict[str, Any] | None:
        """The stored answer of an already charged request_id (``charged`` 0: this request
        costs nothing), or None if it is new; Conflict if it was charged for other inputs."""
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
        observed_labels: list[int] | None = None,
        screening: Screening | None = None,
    ) -> Charge:
        """Atomically charge ``images`` queries and record the answer, or raise BudgetExhausted.

        ``response`` gets ``charged`` / ``queries_used`` / ``queries_remaining`` filled in from
        the charge (a replay of it says ``charged: 0``).
        ``observation`` (the request's images) goes into the query log with ``observed_labels``
        (default: the answered labels; an input defence that withholds some passes the labels
        its model computed). ``screening`` goes into ``input_screening``.
        """
        now = time.time()
        with self._transaction():
            if request_id is not None and not self._claim_request_id(
                client_id, request_id, fingerprint, now
            ):
                # charged already, or just now through another connection or replica (the
                # claim waited for that transaction to commit): its stored answer, free
                stored = self.replay(client_id, request_id, fingerprint)
                if stored is None:
                    raise RuntimeError(f"request_id {request_id!r} was claimed but not stored")
                return Charge(stored, replayed=True)
            row = self._db.execute(
                "UPDATE clients SET used = used + ? WHERE client_id = ? AND revoked = 0"
                " AND used + ? <= budget RETURNING used, budget",
                (images, client_id, images),
            ).fetchone()
            if row is None:
                self._refuse(client_id, images)  # raises, and the claim is rolled back
            response = {
                **response,
                "charged": images,
                "queries_used": row["used"],
                "queries_remaining": row["budget"] - row["used"],
            }
            entry_id = self._db.execute(
                "INSERT INTO ledger (client_id, model, request_id, images, created_at)"
                " VALUES (?,?,?,?,?) RETURNING entry_id",
                (client_id, model, request_id, images, now),
            ).fetchone()["entry_id"]
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
                        json.dumps(
                            response["labels"] if observed_labels is None else observed_labels
                        ),
                    ),
                )
            if screening is not None:
                self._db.execute(
                    "INSERT INTO input_screening VALUES (?,?,?,?,?,?,?,?)",
                    (
                        entry_id,
                        client_id,
                        model,
                        images,
                        sum(screening.flags),
                        screening.rejected,
                        json.dumps(screening.scores),
                        json.dumps(screening.flags),
                    ),
                )
            if request_id is not None:
                self._db.execute(
                    "UPDATE idempotency SET response = ? WHERE client_id = ? AND request_id = ?",
                    (json.dumps(response), client_id, request_id),
                )
        return Charge(response, replayed=False, entry_id=entry_id)

    def _claim_request_id(
        self, client_id: str, request_id: str, fingerprint: str, now: float
    ) -> bool:
        """Inside the charge's transaction: record the request_id first, so a concurrent
        duplicate waits on this row (PostgreSQL) or on the write lock (SQLite) until we commit,
        then finds it taken. False if it is taken; its answer is filled in before commit."""
        claimed = self._db.execute(
            "INSERT INTO idempotency (client_id, request_id, fingerprint, response, created_at)"
            " VALUES (?,?,?,?,?) ON CONFLICT (client_id, request_id) DO NOTHING"
            " RETURNING request_id",
            (client_id, request_id, fingerprint, "", now),
        ).fetchone()
        return claimed is not None

    def _refuse(self, client_id: str, images: int) -> NoReturn:
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

    def screening_log(
        self, client_id: str, model: str, *, after: int = 0
    ) -> Iterator[tuple[int, Screening]]:
        """(entry_id, screening) of one stream's charged requests after ``after``, in order."""
        rows = self._db.execute(
            "SELECT entry_id, rejected, scores, flags FROM input_screening"
            " WHERE client_id = ? AND model = ? AND entry_id > ? ORDER BY entry_id",
            (client_id, model, after),
        ).fetchall()
        for row in rows:
            yield (
                row["entry_id"],
                Screening(json.loads(row["scores"]), json.loads(row["flags"]), row["rejected"]),
            )

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
        self._db.execute(
            "INSERT INTO alarms VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
            (client_id, model, detector, query_index, statistic, threshold, time.time()),
        )

    def list_alarms(self, client_id: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT a.*, c.name AS client_name FROM alarms a JOIN clients c USING (client_id)"
        params: tuple = ()
        if client_id is not None:
            query, params = query + " WHERE a.client_id = ?", (client_id,)
        rows = self._db.execute(query + " ORDER BY a.created_at", params).fetchall()
        return [dict(row) for row in rows]

    def record_detector_error(
        self, client_id: str, *, model: str, detector: str, query_index: int, message: str
    ) -> None:
        """Keep a detector's failure on this stream until ``clear_detector_error``: where and
        when it first failed, and the latest message (a failed rebuild updates only that)."""
        self._db.execute(
            "INSERT INTO detector_errors VALUES (?,?,?,?,?,?) ON CONFLICT"
            " (client_id, model, detector) DO UPDATE SET message = excluded.message",
            (client_id, model, detector, query_index, message, time.time()),
        )

    def clear_detector_error(self, client_id: str, *, model: str, detector: str) -> None:
        self._db.execute(
            "DELETE FROM detector_errors WHERE client_id = ? AND model = ? AND detector = ?",
            (client_id, model, detector),
        )

    def list_detector_errors(self) -> list[dict[str, Any]]:
        """Every detector currently in error, with its client's name, oldest first."""
        rows = self._db.execute(
            "SELECT e.*, c.name AS client_name FROM detector_errors e"
            " JOIN clients c USING (client_id) ORDER BY e.created_at"
        ).fetchall()
        return [dict(row) for row in rows]

    def models_queried(self, client_id: str) -> list[str]:
        """The models this client has been charged on, most queries first."""
        rows = self._db.execute(
            "SELECT model FROM ledger WHERE client_id = ? GROUP BY model ORDER BY SUM(images) DESC",
            (client_id,),
        ).fetchall()
        return [row["model"] for row in rows]

    def ledger_total(self, client_id: str) -> int:
        row = self._db.execute(
            "SELECT COALESCE(SUM(images), 0) AS total FROM ledger WHERE client_id = ?",
            (client_id,),
        ).fetchone()
        return int(row["total"])

    # -- training quotas -----------------------------------------------------------------------
    def training_usage(self, client_id: str) -> tuple[int, int]:
        """(quota, used) in image-epochs; a client created before quotas existed has (0, 0)."""
        row = self._db.execute(
            "SELECT quota, used FROM training_quotas WHERE client_id = ?", (client_id,)
        ).fetchone()
        return (0, 0) if row is None else (int(row["quota"]), int(row["used"]))

    def training_ledger(self, client_id: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT * FROM training_ledger WHERE client_id = ? ORDER BY entry_id", (client_id,)
        ).fetchall()
        return [dict(row) for row in rows]

    def _refund(self, job: Row, epochs_run: int, reason: str) -> None:
        """Give back the image-epochs a job reserved but did not run (inside a transaction)."""
        unused = (job["epochs"] - epochs_run) * job["train_images"]
        if unused <= 0:
            return
        self._db.execute(
            "UPDATE training_quotas SET used = used - ? WHERE client_id = ?",
            (unused, job["client_id"]),
        )
        self._db.execute(
            "INSERT INTO training_ledger (client_id, job_id, image_epochs, reason, created_at)"
            " VALUES (?,?,?,?,?)",
            (job["client_id"], job["job_id"], -unused, reason, time.time()),
        )

    # -- datasets ------------------------------------------------------------------------------
    def add_dataset(self, row: dict[str, Any]) -> None:
        row = {**row, "shape": json.dumps(row["shape"])}
        columns = ", ".join(row)
        self._db.execute(
            f"INSERT INTO datasets ({columns}) VALUES ({', '.join('?' * len(row))})",
            tuple(row.values()),
        )

    def get_dataset(self, dataset_id: str, client_id: str | None = None) -> dict[str, Any]:
        """A dataset row; NotFound if it does not exist or belongs to another client."""
        row = self._dataset_row(dataset_id, client_id)
        return _dataset(row)

    def _dataset_row(self, dataset_id: str, client_id: str | None) -> Row:
        row = self._db.execute(
            "SELECT * FROM datasets WHERE dataset_id = ?", (dataset_id,)
        ).fetchone()
        if row is None or (client_id is not None and row["client_id"] != client_id):
            raise NotFound(f"no dataset with id {dataset_id[:100]!r}", code="unknown_dataset")
        return row

    def list_datasets(self, client_id: str | None = None) -> list[dict[str, Any]]:
        return [_dataset(row) for row in self._owned_rows("datasets", client_id)]

    def _owned_rows(self, table: str, client_id: str | None) -> list[Row]:
        """Every row of ``table`` (one of this module's), or one client's, oldest first."""
        query, params = f"SELECT * FROM {table}", cast(tuple[str, ...], ())
        if client_id is not None:
            query, params = query + " WHERE client_id = ?", (client_id,)
        return self._db.execute(query + " ORDER BY created_at", params).fetchall()

    def delete_dataset(self, dataset_id: str, client_id: str | None = None) -> dict[str, Any]:
        """Remove the row (the caller removes the file). Jobs already trained keep their model;
        a queued job on it fails when a worker finds the data gone."""
        with self._transaction():
            row = self._dataset_row(dataset_id, client_id)
            self._db.execute("DELETE FROM datasets WHERE dataset_id = ?", (dataset_id,))
        return _dataset(row)

    # -- training jobs -------------------------------------------------------------------------
    def submit_job(self, job: dict[str, Any], *, test_dataset_id: str | None) -> dict[str, Any]:
        """Queue a job in one transaction, or create nothing: its datasets must be the client's
        (404), its hosted name free (409), and its image-epochs within the quota (402)."""
        now = time.time()
        cost = job["epochs"] * job["train_images"]
        with self._transaction():
            self._dataset_row(job["dataset_id"], job["client_id"])
            if test_dataset_id is not None:
                self._dataset_row(test_dataset_id, job["client_id"])
            taken = self._db.execute(
                "SELECT job_id FROM training_jobs WHERE model = ? AND status IN (?,?,?)",
                (job["model"], "queued", "running", "succeeded"),
            ).fetchone()
            if taken is not None:
                raise Conflict(
                    f"model name {job['model'][:100]!r} is already taken (job {taken['job_id']})",
                    code="model_name_taken",
                )
            charged = self._db.execute(
                "UPDATE training_quotas SET used = used + ? WHERE client_id = ?"
                " AND used + ? <= quota RETURNING used",
                (cost, job["client_id"], cost),
            ).fetchone()
            if charged is None:
                quota, used = self._quota_row(job["client_id"])
                raise QuotaExceeded(
                    f"this job needs {cost} image-epochs ({job['train_images']} images x "
                    f"{job['epochs']} epochs) but the training quota has {quota - used} left "
                    f"of {quota}"
                )
            row = {**job, "spec": json.dumps(job["spec"]), "status": "queued", "created_at": now}
            self._db.execute(
                f"INSERT INTO training_jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                tuple(row.values()),
            )
            self._db.execute(
                "INSERT INTO training_ledger (client_id, job_id, image_epochs, reason, created_at)"
                " VALUES (?,?,?,?,?)",
                (job["client_id"], job["job_id"], cost, "reserved", now),
            )
        return self.get_job(job["job_id"])

    def _quota_row(self, client_id: str) -> tuple[int, int]:
        row = self._db.execute(
            "SELECT quota, used FROM training_quotas WHERE client_id = ?", (client_id,)
        ).fetchone()
        return (0, 0) if row is None else (int(row["quota"]), int(row["used"]))

    def get_job(self, job_id: str, client_id: str | None = None) -> dict[str, Any]:
        row = self._job_row(job_id, client_id)
        return _job(row)

    def _job_row(self, job_id: str, client_id: str | None) -> Row:
        row = self._db.execute("SELECT * FROM training_jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None or (client_id is not None and row["client_id"] != client_id):
            raise NotFound(f"no training job with id {job_id[:100]!r}", code="unknown_job")
        return row

    def list_jobs(self, client_id: str | None = None) -> list[dict[str, Any]]:
        return [_job(row) for row in self._owned_rows("training_jobs", client_id)]

    def cancel_job(self, job_id: str, client_id: str | None = None) -> dict[str, Any]:
        """Cancel a queued or running job and refund the epochs it did not run; a running
        job's worker sees its claim gone at the next epoch and stops."""
        allowed = sources("cancelled")
        with self._transaction():
            job = self._job_row(job_id, client_id)
            if job["status"] not in allowed:
                raise Conflict(
                    f"job {job_id} is already {job['status']}; only a queued or running job "
                    "can be cancelled",
                    code="job_finished",
                )
            self._db.execute(
                "UPDATE training_jobs SET status = 'cancelled', claim_token = NULL,"
                " lease_until = NULL, finished_at = ? WHERE job_id = ?",
                (time.time(), job_id),
            )
            self._refund(job, job["epoch"], "cancelled")
        return self.get_job(job_id)

    def claim_job(self, token: str, *, lease_seconds: float) -> dict[str, Any] | None:
        """Take the oldest queued job, or a running one whose worker's lease ran out (it died);
        None if there is none. One conditional UPDATE, so two workers never both get it."""
        now = time.time()
        with self._transaction():
            row = self._db.execute(
                "SELECT job_id FROM training_jobs WHERE status = 'queued'"
                " OR (status = 'running' AND lease_until < ?) ORDER BY created_at LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            claimed = self._db.execute(
                "UPDATE training_jobs SET status = 'running', claim_token = ?, lease_until = ?,"
                " attempts = attempts + 1, started_at = COALESCE(started_at, ?)"
                " WHERE job_id = ? AND (status = 'queued' OR (status = 'running' AND lease_until < ?))",
                (token, now + lease_seconds, now, row["job_id"], now),
            ).rowcount
        return self.get_job(row["job_id"]) if claimed else None

    def renew_lease(self, job_id: str, token: str, *, lease_seconds: float) -> bool:
        """Extend a running job's lease; False once the job is no longer this worker's."""
        return bool(
            self._db.execute(
                "UPDATE training_jobs SET lease_until = ? WHERE job_id = ?"
                " AND claim_token = ? AND status = 'running'",
                (time.time() + lease_seconds, job_id, token),
            ).rowcount
        )

    def record_epoch(
        self, job_id: str, token: str, *, epoch: int, loss: float, train_accuracy: float
    ) -> bool:
        """Progress after an epoch whose checkpoint is on disk; False if the job is no longer
        this worker's (cancelled, or its lease expired and another worker took it)."""
        with self._transaction():
            job = self._db.execute(
                "UPDATE training_jobs SET epoch = ?, loss = ?, train_accuracy = ?"
                " WHERE job_id = ? AND claim_token = ? AND status = 'running' RETURNING attempts",
                (epoch, loss, train_accuracy, job_id, token),
            ).fetchone()
            if job is None:
                return False
            self._db.execute(
                "INSERT INTO training_epochs VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (job_id, epoch, job["attempts"], loss, train_accuracy, time.time()),
            )
        return True

    def finish_job(
        self,
        job_id: str,
        token: str,
        *,
        status: str,
        metrics: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> bool:
        """Move this worker's running job to ``succeeded`` or ``failed`` (refunding what a
        failed job did not run), or back to ``queued`` when the worker stops mid-job."""
        if status not in ("succeeded", "failed", "queued"):
            raise ValueError(f"status must be succeeded, failed or queued, got {status!r}")
        with self._transaction():
            job = self._db.execute(
                "SELECT * FROM training_jobs WHERE job_id = ? AND claim_token = ?"
                f" AND status IN ({', '.join('?' * len(sources(status)))})",
                (job_id, token, *sources(status)),
            ).fetchone()
            if job is None:
                return False
            final = status in FINAL
            self._db.execute(
                "UPDATE training_jobs SET status = ?, metrics = COALESCE(?, metrics), error = ?,"
                " claim_token = NULL, lease_until = NULL, finished_at = ? WHERE job_id = ?",
                (
                    status,
                    None if metrics is None else json.dumps(metrics),
                    error,
                    time.time() if final else None,
                    job_id,
                ),
            )
            if status == "failed":
                self._refund(job, job["epoch"], "failed")
        return True

    def epoch_log(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT * FROM training_epochs WHERE job_id = ? ORDER BY epoch", (job_id,)
        ).fetchall()
        return [dict(row) for row in rows]

    def hosted_jobs(self) -> list[dict[str, Any]]:
        """Succeeded jobs, whose models the service hosts, oldest first."""
        rows = self._db.execute(
            "SELECT * FROM training_jobs WHERE status = 'succeeded' ORDER BY finished_at"
        ).fetchall()
        return [_job(row) for row in rows]

    def hosted_job(self, model: str) -> dict[str, Any] | None:
        """The succeeded job that produced the hosted model ``model``, if any."""
        row = self._db.execute(
            "SELECT * FROM training_jobs WHERE model = ? AND status = 'succeeded'", (model,)
        ).fetchone()
        return None if row is None else _job(row)

    def unfinished_jobs(self) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) AS n FROM training_jobs WHERE status IN ('queued', 'running')"
        ).fetchone()
        return int(row["n"])

    # -- membership challenges ---------------------------------------------------------------
    def add_membership_challenge(self, row: dict[str, Any]) -> None:
        """Store a new challenge; ``row["candidates"]`` (the ground truth) is kept as JSON."""
        self._db.execute(
            "INSERT INTO membership_challenges (challenge_id, client_id, model, n, seed,"
            " members_from, non_members_from, candidates, created_at)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            (
                row["challenge_id"], row["client_id"], row["model"], row["n"], row["seed"],
                row["members_from"], row["non_members_from"],
                json.dumps(row["candidates"]), row["created_at"],
            ),
        )  # fmt: skip

    def get_membership_challenge(
        self, challenge_id: str, client_id: str | None = None
    ) -> dict[str, Any]:
        """One challenge; with ``client_id``, only if it was opened for that client (another
        client's challenge is "not found", exactly like one that does not exist)."""
        row = self._db.execute(
            "SELECT * FROM membership_challenges WHERE challenge_id = ?", (challenge_id,)
        ).fetchone()
        if row is None or (client_id is not None and row["client_id"] != client_id):
            raise NotFound(
                f"no membership challenge with id {echo(challenge_id)}", code="unknown_challenge"
            )
        return _membership_challenge(row)

    def list_membership_challenges(self) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT * FROM membership_challenges ORDER BY created_at"
        ).fetchall()
        return [_membership_challenge(row) for row in rows]

    def record_membership_result(self, challenge_id: str, result: dict[str, Any]) -> None:
        """Keep a challenge's one result; a second submission (even a concurrent one) is 409."""
        cursor = self._db.execute(
            "UPDATE membership_challenges SET result = ?, submitted_at = ?"
            " WHERE challenge_id = ? AND result IS NULL",
            (json.dumps(result), time.time(), challenge_id),
        )
        if cursor.rowcount == 0:
            raise already_submitted(challenge_id)

    # -- detection off the request path and cross-client groups ------------------------------
    # (tables in DETECTION_SCHEMA; the lease and cursor logic is target_service/detect_worker.py)
    def client_orgs(self) -> dict[str, str]:
        """client_id -> org, for the clients created with one."""
        rows = self._db.execute("SELECT client_id, org FROM client_orgs").fetchall()
        return {row["client_id"]: row["org"] for row in rows}

    def detection_streams(self, groups: str, *, after: int = 0) -> list[tuple[str, str, int]]:
        """(stream, model, last entry) of every stream with query_log entries after ``after``:
        each client, and (``groups`` "org") each org as 'org:<org>' or ("all") every client
        together as 'all'."""
        query = _STREAM_QUERIES[groups]
        rows = self._db.execute(query, (after,) * query.count("?")).fetchall()
        return [(row["stream"], row["model"], int(row["last_entry"])) for row in rows]

    def detection_log(
        self,
        model: str,
        *,
        after: int,
        client_id: str | None = None,
        org: str | None = None,
    ) -> Iterator[tuple[int, str, np.ndarray, list[int]]]:
        """(entry_id, client_id, images, labels) after ``after``, in order, of one client's
        stream, of an org's clients, or (neither given) of every client on ``model``."""
        query = (
            "SELECT entry_id, client_id, dtype, shape, images, labels FROM query_log"
            " WHERE model = ? AND entry_id > ?"
        )
        params: tuple[Any, ...] = (model, after)
        if client_id is not None:
            query, params = query + " AND client_id = ?", (*params, client_id)
        elif org is not None:
            query += " AND client_id IN (SELECT client_id FROM client_orgs WHERE org = ?)"
            params = (*params, org)
        rows = self._db.execute(query + " ORDER BY entry_id", params).fetchall()
        for row in rows:
            images = np.frombuffer(row["images"], dtype=np.dtype(row["dtype"])).reshape(
                json.loads(row["shape"])
            )
            yield row["entry_id"], row["client_id"], images, json.loads(row["labels"])

    def detection_leases(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM detection_leases ORDER BY stream, model").fetchall()
        return [dict(row) for row in rows]

    def claim_detection_stream(
        self, stream: str, model: str, owner: str, *, lease_seconds: float
    ) -> int | None:
        """Take (or keep) a stream for ``owner`` when it is free, already its own, or its
        owner's lease ran out; returns its last processed entry, None if another owns it."""
        now = time.time()
        row = self._db.execute(
            "INSERT INTO detection_leases (stream, model, owner, lease_until) VALUES (?,?,?,?)"
            " ON CONFLICT (stream, model) DO UPDATE SET owner = excluded.owner,"
            " lease_until = excluded.lease_until WHERE detection_leases.owner IS NULL"
            " OR detection_leases.owner = excluded.owner OR detection_leases.lease_until < ?"
            " RETURNING through_entry",
            (stream, model, owner, now + lease_seconds, now),
        ).fetchone()
        return None if row is None else int(row["through_entry"])

    def renew_detection_leases(self, owner: str, *, lease_seconds: float) -> set[tuple[str, str]]:
        """Extend every lease ``owner`` holds; returns the (stream, model) it still holds."""
        rows = self._db.execute(
            "UPDATE detection_leases SET lease_until = ? WHERE owner = ? RETURNING stream, model",
            (time.time() + lease_seconds, owner),
        ).fetchall()
        return {(row["stream"], row["model"]) for row in rows}

    def advance_detection_stream(
        self,
        stream: str,
        model: str,
        owner: str,
        *,
        through_entry: int,
        alarms: list[dict[str, Any]],
    ) -> bool:
        """Move a stream's cursor and record the alarms its detectors raised up to there, in one
        transaction; False (nothing written) when ``owner`` no longer holds the stream. An alarm
        is ``{detector, query_index, client_id, statistic, threshold}``; a stream's first alarm
        per detector is kept (a rebuilt detector raises the same one again)."""
        now = time.time()
        with self._transaction():
            moved = self._db.execute(
                "UPDATE detection_leases SET through_entry = ?"
                " WHERE stream = ? AND model = ? AND owner = ?",
                (through_entry, stream, model, owner),
            ).rowcount
            if not moved:
                return False
            for alarm in alarms:
                values = (alarm["detector"], alarm["query_index"], alarm["statistic"])
                if stream == alarm["client_id"]:  # a client's own stream
                    self._db.execute(
                        "INSERT INTO alarms VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                        (stream, model, *values, alarm["threshold"], now),
                    )
                else:
                    self._db.execute(
                        "INSERT INTO group_alarms VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                        (stream, model, *values[:2], alarm["client_id"], *values[2:],
                         alarm["threshold"], now),
                    )  # fmt: skip
        return True

    def release_detection_leases(self, owner: str) -> None:
        """Free every stream ``owner`` holds (a worker stopping), cursors kept."""
        self._db.execute(
            "UPDATE detection_leases SET owner = NULL, lease_until = NULL WHERE owner = ?",
            (owner,),
        )

    def alarm_blocks(self, client_id: str, model: str, detectors: list[str]) -> bool:
        """Whether one of ``detectors`` has an alarm on this client's stream, or on its org's."""
        if not detectors:
            return False
        names = ", ".join("?" * len(detectors))
        row = self._db.execute(
            f"SELECT 1 FROM alarms WHERE client_id = ? AND model = ? AND detector IN ({names})"
            " UNION ALL SELECT 1 FROM group_alarms g JOIN client_orgs o"
            " ON g.stream = 'org:' || o.org WHERE o.client_id = ? AND g.model = ?"
            f" AND g.detector IN ({names}) LIMIT 1",
            (client_id, model, *detectors, client_id, model, *detectors),
        ).fetchone()
        return row is not None

    def list_group_alarms(self) -> list[dict[str, Any]]:
        """Every group's first alarm per detector and model, with the name of the client whose
        query raised it, oldest first."""
        rows = self._db.execute(
            "SELECT g.*, c.name AS client_name FROM group_alarms g"
            " JOIN clients c USING (client_id) ORDER BY g.created_at"
        ).fetchall()
        return [dict(row) for row in rows]


_CLIENT_STREAMS = (
    "SELECT client_id AS stream, model, MAX(entry_id) AS last_entry FROM query_log"
    " WHERE entry_id > ? GROUP BY client_id, model"
)
_STREAM_QUERIES = {  # a group is watched in addition to each of its clients
    "client": _CLIENT_STREAMS,
    "org": _CLIENT_STREAMS + " UNION ALL SELECT 'org:' || o.org, q.model, MAX(q.entry_id)"
    " FROM query_log q JOIN client_orgs o USING (client_id) WHERE q.entry_id > ? GROUP BY 1, 2",
    "all": _CLIENT_STREAMS + " UNION ALL SELECT 'all', model, MAX(entry_id) FROM query_log"
    " WHERE entry_id > ? GROUP BY model",
}
# -- end of the detection block ------------------------------------------------------------------


def already_submitted(challenge_id: str) -> Conflict:
    """The refusal of a second submission to a membership challenge."""
    return Conflict(
        f"membership challenge {echo(challenge_id)} was already scored: one submission per"
        " challenge",
        code="already_submitted",
    )


def _membership_challenge(row: Row) -> dict[str, Any]:
    challenge = dict(row)
    challenge["candidates"] = json.loads(row["candidates"])
    challenge["result"] = json.loads(row["result"]) if row["result"] else None
    return challenge


def _dataset(row: Row) -> dict[str, Any]:
    return {**dict(row), "shape": json.loads(row["shape"])}


def _job(row: Row) -> dict[str, Any]:
    job = dict(row)
    job["spec"] = json.loads(row["spec"])
    job["metrics"] = json.loads(row["metrics"]) if row["metrics"] else None
    return job


def _replayed(stored: str) -> dict[str, Any]:
    """A stored answer as its replay: the same labels and meter, and nothing charged for it."""
    return {**json.loads(stored), "charged": 0}


def _client(row: Row) -> Client:
    return Client(
        row["client_id"],
        row["name"],
        row["budget"],
        row["used"],
        bool(row["revoked"]),
        row["created_at"],
    )


class SQLiteStore(SQLStore):
    """The embedded default: one SQLite file (WAL) under the state directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        super().__init__(SQLiteDatabase(self.path))


class PostgresStore(SQLStore):
    """PostgreSQL at ``url`` through a pool of up to ``pool_size`` connections; any number of
    stores (replicas, workers) may share the database."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        super().__init__(PostgresDatabase(url, pool_size=pool_size))


def store_at(address: str | Path, *, pool_size: int = 10) -> StateStore:
    """The store at ``address``: a ``postgresql://`` URL, or else a SQLite file's path."""
    text = str(address)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresStore(text, pool_size=pool_size)
    return SQLiteStore(text)


def open_store(settings: Settings) -> StateStore:
    """PostgreSQL when ``TARGET_DATABASE_URL`` is set, else SQLite in the state directory."""
    url = settings.database_url
    address = settings.state_path if url is None else url.get_secret_value()
    return store_at(address, pool_size=settings.database_pool_size)
