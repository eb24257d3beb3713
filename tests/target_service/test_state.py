"""StateStore on its own, on both backends (SQLite and a real PostgreSQL): hashed keys,
revocation, atomic charges, idempotent replays, races (threads sharing one store, two stores on
one database, and processes each with its own store), and schema migrations."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from target_service import state
from target_service.errors import (
    BudgetExhausted,
    Conflict,
    NotFound,
    StateUnavailable,
    Unauthorized,
)
from target_service.settings import Settings, describe_settings_error
from target_service.state import SQLiteStore, StateStore, hash_api_key, store_at
from target_service.state_db import mask_password


@pytest.fixture
def store(state_address: str) -> Iterator[StateStore]:
    store = store_at(state_address)
    yield store
    store.close()


def charge(store: StateStore, client_id: str, images: int, request_id: str | None = None, fp="f"):
    return store.charge(
        client_id,
        model="lenet5-mnist",
        images=images,
        request_id=request_id,
        fingerprint=fp,
        response={"labels": [0] * images},
    )


def ledger(store: StateStore, client_id: str) -> list[tuple[str | None, int]]:
    rows = store._db.execute(  # type: ignore[attr-defined]
        "SELECT request_id, images FROM ledger WHERE client_id = ? ORDER BY entry_id",
        (client_id,),
    ).fetchall()
    return [(row["request_id"], row["images"]) for row in rows]


def run_together(work: Callable[[int], Any], threads: int, timeout: float = 300) -> None:
    """``work(index)`` in ``threads`` threads that all start at once; each must finish."""
    start = threading.Barrier(threads)

    def run(index: int) -> None:
        start.wait()
        work(index)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=timeout)
    assert not any(thread.is_alive() for thread in pool)


def test_api_key_is_stored_only_as_its_hash(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "state.sqlite3")
    keys = [store.create_client(f"client-{i}", 10)[1] for i in range(5)]
    while_open = b"".join(path.read_bytes() for path in tmp_path.iterdir() if path.is_file())
    store.close()
    after_close = b"".join(path.read_bytes() for path in tmp_path.iterdir() if path.is_file())
    stored = while_open + after_close  # the database, its WAL and shared memory files
    assert after_close, "the state file must exist"
    for key in keys:
        assert key.startswith("mlr_") and len(key) > 40
        assert key.encode() not in stored
        secret = key.removeprefix("mlr_").encode()
        assert secret not in stored
    with sqlite3.connect(tmp_path / "state.sqlite3") as db:
        hashes = {row[0] for row in db.execute("SELECT key_hash FROM clients")}
    assert hashes == {hashlib.sha256(key.encode()).hexdigest() for key in keys}
    assert hashes == {hash_api_key(key) for key in keys}


def test_authenticate_and_revoke(store: StateStore) -> None:
    client, key = store.create_client("alice", 10)
    _, other_key = store.create_client("bob", 10)
    assert store.authenticate(key).client_id == client.client_id
    with pytest.raises(Unauthorized, match="unknown API key") as unknown:
        store.authenticate(key + "x")
    assert unknown.value.code == "unknown_api_key"

    revoked = store.revoke_client(client.client_id)
    assert revoked.revoked and store.get_client(client.client_id).revoked
    with pytest.raises(Unauthorized, match="revoked") as refused:
        store.authenticate(key)
    assert refused.value.code == "revoked_api_key"
    with pytest.raises(Unauthorized, match="revoked"):
        charge(store, client.client_id, 1)
    assert store.get_client(client.client_id).used == 0
    assert store.authenticate(other_key).name == "bob"  # others are untouched


@pytest.mark.parametrize("action", ["get", "revoke"])
def test_unknown_client_names_the_id(store: StateStore, action: str) -> None:
    method = store.get_client if action == "get" else store.revoke_client
    with pytest.raises(NotFound, match="'nobody'"):
        method("nobody")


def test_charge_refuses_a_batch_that_does_not_fit_whole(store: StateStore) -> None:
    client, _ = store.create_client("alice", 10)
    first = charge(store, client.client_id, 4)
    assert (first.response["queries_used"], first.response["queries_remaining"]) == (4, 6)
    with pytest.raises(BudgetExhausted, match=r"7 image\(s\) .* remaining budget of 6"):
        charge(store, client.client_id, 7, request_id="too-big")
    assert store.get_client(client.client_id).used == 4
    assert store.replay(client.client_id, "too-big", "f") is None  # nothing stored either
    exact = charge(store, client.client_id, 6)
    assert (exact.response["queries_used"], exact.response["queries_remaining"]) == (10, 0)
    for images in (1, 1, 5):
        with pytest.raises(BudgetExhausted, match="remaining budget of 0"):
            charge(store, client.client_id, images)
    assert store.get_client(client.client_id).used == 10
    assert store.ledger_total(client.client_id) == 10
    assert ledger(store, client.client_id) == [(None, 4), (None, 6)]


def test_the_largest_budget_and_quota_the_api_accepts_fit_every_backend(
    store: StateStore,
) -> None:
    """The API takes budgets up to 10**12, training quotas up to 10**15 and challenge seeds
    below 2**32: more than PostgreSQL's 4-byte INTEGER holds (it once answered 500)."""
    client, _ = store.create_client("whale", 10**12, training_quota=10**15)
    assert charge(store, client.client_id, 3).response["queries_remaining"] == 10**12 - 3
    assert store.get_client(client.client_id).budget == 10**12
    assert store.training_usage(client.client_id) == (10**15, 0)
    challenge = {
        "challenge_id": "c-max-seed", "client_id": client.client_id, "model": "m", "n": 2,
        "seed": 2**32 - 1, "members_from": "train", "non_members_from": "test",
        "candidates": [], "created_at": 0.0,
    }  # fmt: skip
    store.add_membership_challenge(challenge)
    assert store.get_membership_challenge("c-max-seed")["seed"] == 2**32 - 1


def test_replay_returns_the_stored_answer_once_charged(store: StateStore) -> None:
    client, _ = store.create_client("alice", 10)
    other, _ = store.create_client("bob", 10)
    assert store.replay(client.client_id, "r1", "fp-a") is None
    first = charge(store, client.client_id, 3, request_id="r1", fp="fp-a")
    assert not first.replayed and first.response["charged"] == 3
    replayed = {**first.response, "charged": 0}  # same answer and meter, nothing charged
    assert store.replay(client.client_id, "r1", "fp-a") == replayed
    again = charge(store, client.client_id, 3, request_id="r1", fp="fp-a")
    assert again.replayed and again.response == replayed
    with pytest.raises(Conflict, match="'r1'") as conflict:
        store.replay(client.client_id, "r1", "fp-b")
    assert conflict.value.code == "request_id_reused"
    with pytest.raises(Conflict, match="'r1'"):
        charge(store, client.client_id, 2, request_id="r1", fp="fp-b")
    assert store.get_client(client.client_id).used == 3
    assert ledger(store, client.client_id) == [("r1", 3)]
    # request ids are per client
    assert not charge(store, other.client_id, 2, request_id="r1", fp="fp-b").replayed
    assert store.get_client(other.client_id).used == 2


def test_state_survives_reopening(state_address: str) -> None:
    store = store_at(state_address)
    client, key = store.create_client("alice", 10)
    answer = charge(store, client.client_id, 4, request_id="r1").response
    store.close()

    reopened = store_at(state_address)
    try:
        assert reopened.authenticate(key).used == 4
        assert reopened.replay(client.client_id, "r1", "f") == {**answer, "charged": 0}
        assert reopened.ledger_total(client.client_id) == 4
    finally:
        reopened.close()


def test_threads_racing_on_one_budget_never_overspend(store: StateStore) -> None:
    budget, threads = 500, 16
    client, _ = store.create_client("racer", budget)
    answered: Counter[int] = Counter()
    reported: list[int] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        sizes = [1 + (index + step) % 4 for step in range(10_000)]
        for size in sizes:
            try:
                result = charge(store, client.client_id, size)
            except BudgetExhausted:
                if size == 1:
                    return  # nothing fits any more
                continue
            with lock:
                answered[index] += size
                reported.append(result.response["queries_used"])

    run_together(worker, threads)

    assert sum(answered.values()) == budget
    assert store.get_client(client.client_id).used == budget
    assert store.ledger_total(client.client_id) == budget
    assert len(set(reported)) == len(reported), "each charge sees its own usage"
    assert max(reported) == budget
    assert len(ledger(store, client.client_id)) == len(reported)


def test_concurrent_duplicates_of_one_request_id_are_charged_once(store: StateStore) -> None:
    client, _ = store.create_client("dup", 100)
    results = []
    run_together(lambda _: results.append(charge(store, client.client_id, 5, request_id="same")), 8)
    assert len(results) == 8
    assert sum(not result.replayed for result in results) == 1
    assert all(  # one answer; only the charged request says it was charged
        result.response == {**results[0].response, "charged": 0 if result.replayed else 5}
        for result in results
    )
    assert store.get_client(client.client_id).used == 5


# -- across processes: each opens its own StateStore (its own connections) -----------------------
# One run of processes does both races (each process imports torch: seconds under load).
PROCESSES, THREADS_PER_PROCESS = 4, 2


def _charge_until_broke(store: StateStore, client_id: str, index: int) -> list[tuple[int, int]]:
    """Charge batches of 1-4 images until not even one fits: (size, queries_used) per charge."""
    answered = []
    for step in range(10_000):
        size = 1 + (index + step) % 4
        try:
            result = charge(store, client_id, size)
        except BudgetExhausted:
            if size == 1:
                break
            continue
        answered.append((size, result.response["queries_used"]))
    return answered


def _process(
    address: str, racer: str, duplicator: str, index: int, start: Any, results: Any
) -> None:
    """One process: its own StateStore on the shared database, THREADS_PER_PROCESS threads using
    it, all starting together with every other process's threads: each sends the request_id
    "same" for ``duplicator``, then charges ``racer`` until its budget is spent."""
    store = store_at(address)
    duplicates: list[tuple[bool, Any]] = []
    answered: list[tuple[int, int]] = []

    def thread(sub: int) -> None:
        start.wait()
        result = charge(store, duplicator, 5, request_id="same")
        duplicates.append((result.replayed, result.response))
        answered.extend(_charge_until_broke(store, racer, index * THREADS_PER_PROCESS + sub))

    pool = [threading.Thread(target=thread, args=(i,)) for i in range(THREADS_PER_PROCESS)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    store.close()
    results.put((duplicates, answered))


def test_processes_racing_never_overspend_nor_charge_a_request_id_twice(
    store: StateStore, state_address: str
) -> None:
    budget = 500
    racer, _ = store.create_client("racer", budget)
    duplicator, _ = store.create_client("dup", 100)
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    start = context.Barrier(PROCESSES * THREADS_PER_PROCESS)
    queue = context.Queue()
    processes = [
        context.Process(
            target=_process,
            args=(state_address, racer.client_id, duplicator.client_id, i, start, queue),
        )
        for i in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    collected = [queue.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0] * PROCESSES
    duplicates = [item for out, _ in collected for item in out]
    answered = [item for _, out in collected for item in out]

    assert len(duplicates) == PROCESSES * THREADS_PER_PROCESS
    assert sum(not replayed for replayed, _ in duplicates) == 1
    first = duplicates[0][1]
    assert all(  # one answer; only the charged request says it was charged
        response == {**first, "charged": 0 if replayed else 5} for replayed, response in duplicates
    )
    assert store.get_client(duplicator.client_id).used == 5
    assert store.ledger_total(duplicator.client_id) == 5

    reported = [used for _, used in answered]
    assert sum(size for size, _ in answered) == budget
    assert store.get_client(racer.client_id).used == budget
    assert store.ledger_total(racer.client_id) == budget
    assert sorted(reported) == sorted(set(reported)), "each charge sees its own usage"
    assert max(reported) == budget
    assert len(ledger(store, racer.client_id)) == len(answered)


def test_budget_zero_client_can_never_be_charged(store: StateStore) -> None:
    client, _ = store.create_client("broke", 0)
    with pytest.raises(BudgetExhausted, match="remaining budget of 0"):
        charge(store, client.client_id, 1)
    assert store.ledger_total(client.client_id) == 0


def test_database_files_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a typical umask would make them world-readable
    try:
        store = SQLiteStore(tmp_path / "state.sqlite3")
        store.create_client("alice", 5)
        modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
        store.close()
    finally:
        os.umask(old)
    assert modes == {"state.sqlite3": 0o600, "state.sqlite3-wal": 0o600, "state.sqlite3-shm": 0o600}


# -- several stores on one database (replicas) ---------------------------------------------------
def test_64_threads_on_two_stores_never_overspend_one_budget(state_address: str) -> None:
    """Two stores on one database stand for two replicas; 32 threads each charge one budget."""
    budget, threads = 2000, 64
    stores = [store_at(state_address, pool_size=16) for _ in range(2)]
    try:
        client, _ = stores[0].create_client("racer", budget)
        answered: list[tuple[int, int]] = []
        run_together(
            lambda i: answered.extend(_charge_until_broke(stores[i % 2], client.client_id, i)),
            threads,
        )
        used = stores[1].get_client(client.client_id).used
        assert used == budget == sum(size for size, _ in answered), (
            "0 overspend, and every answered charge counted"
        )
        assert sum(images for _, images in ledger(stores[0], client.client_id)) == used
    finally:
        for store in stores:
            store.close()


def test_a_request_id_charged_through_two_stores_at_once_is_charged_once(
    state_address: str,
) -> None:
    """In each of 20 rounds, 16 threads on two stores send one new request_id at once: one is
    charged, the others wait for its commit and get its stored answer (README)."""
    rounds, threads = 20, 16
    stores = [store_at(state_address) for _ in range(2)]
    try:
        client, _ = stores[0].create_client("dup", 5 * rounds)
        results: dict[str, list] = {f"r{round_}": [] for round_ in range(rounds)}
        barrier = threading.Barrier(threads, timeout=60)

        def work(index: int) -> None:
            try:
                for request_id, answers in results.items():
                    barrier.wait()
                    answers.append(charge(stores[index % 2], client.client_id, 5, request_id))
            except BaseException:
                barrier.abort()  # the other threads stop at the next round, not in a minute
                raise

        run_together(work, threads)
        for answers in results.values():
            assert len(answers) == threads
            assert sum(not answer.replayed for answer in answers) == 1
            charged = next(answer for answer in answers if not answer.replayed).response
            assert all(a.response == {**charged, "charged": 0} for a in answers if a.replayed)
        assert stores[1].get_client(client.client_id).used == 5 * rounds
        assert ledger(stores[0], client.client_id) == [(request_id, 5) for request_id in results]
    finally:
        for store in stores:
            store.close()


# -- schema migrations -----------------------------------------------------------------------
DATA = Path(__file__).parent / "data"


def test_a_state_file_from_before_migrations_opens_and_migrates(tmp_path: Path) -> None:
    """A SQLite file written by the service before schema versions existed (made by that code,
    kept in tests/target_service/data) keeps its clients, charges and answers."""
    path = tmp_path / "state.sqlite3"
    shutil.copyfile(DATA / "state-before-migrations.sqlite3", path)
    old = json.loads((DATA / "state-before-migrations.json").read_text())
    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert "schema_migrations" not in tables and "clients" in tables

    store = SQLiteStore(path)
    try:
        assert store.schema_version() == state.MIGRATIONS[-1][0]
        client = store.authenticate(old["api_key"])
        assert (client.client_id, client.used, client.budget) == (old["client_id"], 3, 100)
        replay = store.replay(client.client_id, old["request_id"], old["fingerprint"])
        assert replay == {**old["answer"], "charged": 0}
        assert store.training_usage(client.client_id) == (50, 0)
        assert [alarm["query_index"] for alarm in store.list_alarms()] == [3]
        assert charge(store, client.client_id, 2, request_id="r2").response["queries_used"] == 5
    finally:
        store.close()


def test_migrations_are_applied_in_order_once_and_a_newer_schema_is_refused(
    state_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = store_at(state_address)
    newest = state.MIGRATIONS[-1][0]
    assert first.schema_version() == newest
    first.close()
    later = (newest + 1, "a later step", "CREATE TABLE later_step (x INTEGER);")
    monkeypatch.setattr(state, "MIGRATIONS", [*state.MIGRATIONS, later])
    for _ in range(2):  # the second opening must not run the later step again
        store = store_at(state_address)
        assert store.schema_version() == newest + 1
        store._db.execute("INSERT INTO later_step VALUES (?)", (1,))  # type: ignore[attr-defined]
        rows = store._db.execute("SELECT version FROM schema_migrations ORDER BY version")  # type: ignore[attr-defined]
        assert [row["version"] for row in rows.fetchall()] == list(range(1, newest + 2))
        store.close()
    monkeypatch.setattr(state, "MIGRATIONS", state.MIGRATIONS[:-1])
    with pytest.raises(
        StateUnavailable, match=f"schema version {newest + 1}, newer than this service knows"
    ):
        store_at(state_address)


def test_the_database_url_must_be_postgresql_and_its_password_is_never_echoed() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(database_url="mysql://alice:s3cret-pw@db/range")
    message = describe_settings_error(refused.value)
    assert "TARGET_DATABASE_URL: Value error, must be a postgresql:// URL, got scheme 'mysql'" in (
        message
    )
    assert "s3cret-pw" not in message
    assert mask_password("postgresql://alice:s3cret-pw@db:5432/range?sslmode=require") == (
        "postgresql://alice:***@db:5432/range?sslmode=require"
    )
