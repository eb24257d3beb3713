"""Shared fixtures: one tiny trained target checkpoint per session, and real servers.

- ``trained_checkpoints``: a checkpoint directory holding ``lenet5-mnist.pt`` trained for one
  epoch on the embedded MNIST split (seconds; about 80% test accuracy), trained once per session.
- ``live_server_factory``: ``start(**env) -> LiveServer`` starts ``target-service serve`` in a
  subprocess on a free port with its own state directory (settings as keyword arguments, e.g.
  ``start(rate_limit=2, max_batch=50)``); every server it started is stopped at the test's end.
- ``admin_create_client(server, name, budget) -> (client_id, api_key)``.
- ``postgres_server`` / ``postgres_url``: one real PostgreSQL for the whole session (the
  machine's binaries, ``target_service.postgres_server``), and the URL of its database. It FAILS,
  never skips, when PostgreSQL cannot start. ``fresh_postgres_url``: a new empty database on that
  server for one test (a database per test is cheap; a server per test is not).
- ``state_address``: parametrised over both state backends, where one test's state lives: a
  SQLite file or a fresh PostgreSQL database (open it with ``target_service.state.store_at``;
  open it twice for two replicas on one database).
- ``one_torch_thread``: torch on one thread for a module (``pytestmark =
  pytest.mark.usefixtures("one_torch_thread")``): small batches on a shared 2-core machine run
  several times faster on one thread.

The helpers live in ``target_service.testing`` so benchmarks use the same code.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from target_service.postgres_server import PostgresServer, temporary_postgres
from target_service.testing import LiveServer, admin_create_client

__all__ = ["LiveServer", "admin_create_client"]


@pytest.fixture(scope="session")
def trained_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from target_service.zoo import TARGETS, train_target

    checkpoint_dir = tmp_path_factory.mktemp("checkpoints")
    train_target(TARGETS["lenet5-mnist"], checkpoint_dir, epochs=1)
    return checkpoint_dir


class ServerFactory:
    """Starts LiveServers under one temporary folder and stops all of them on ``close()``."""

    def __init__(self, root: Path, checkpoint_dir: Path) -> None:
        self.root, self.checkpoint_dir = root, checkpoint_dir
        self.servers: list[LiveServer] = []

    def __call__(self, *, models: tuple[str, ...] = ("lenet5-mnist",), **env: Any) -> LiveServer:
        index = len(self.servers)
        server = LiveServer(
            checkpoint_dir=env.pop("checkpoint_dir", self.checkpoint_dir),
            state_dir=self.root / f"server{index}" / "state",
            log_path=self.root / f"server{index}" / "server.log",
            models=models,
            env=env,
        )
        self.servers.append(server)
        return server.start()

    def close(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def live_server_factory(
    tmp_path: Path, trained_checkpoints: Path
) -> Iterator[Callable[..., LiveServer]]:
    factory = ServerFactory(tmp_path, trained_checkpoints)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def module_server_factory(
    tmp_path_factory: pytest.TempPathFactory, trained_checkpoints: Path
) -> Iterator[Callable[..., LiveServer]]:
    """Like ``live_server_factory``, for servers shared by the tests of one module."""
    factory = ServerFactory(tmp_path_factory.mktemp("servers"), trained_checkpoints)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with temporary_postgres(durable=False) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.url


_database_numbers = itertools.count()


@pytest.fixture
def fresh_postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database(f"test_{next(_database_numbers)}")


@pytest.fixture(params=["sqlite", "postgres"])
def state_address(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "state.sqlite3")
    return str(request.getfixturevalue("fresh_postgres_url"))
