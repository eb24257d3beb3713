"""The throwaway PostgreSQL launcher: it starts, answers, restarts on the same port and data,
and says clearly why when it cannot start."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from target_service import postgres_server
from target_service.postgres_server import (
    PostgresServer,
    PostgresUnavailable,
    temporary_postgres,
)


def test_the_session_server_answers_on_its_database(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as connection:
        row = connection.execute("SELECT current_database(), inet_server_addr()").fetchone()
    assert row is not None
    assert row[0] == "mlaas" and str(row[1]) == "127.0.0.1"


def test_a_fresh_database_per_test_is_empty_and_distinct(
    fresh_postgres_url: str, postgres_url: str
) -> None:
    assert fresh_postgres_url != postgres_url
    with psycopg.connect(fresh_postgres_url) as connection:
        tables = connection.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
    assert tables == (0,)


@pytest.fixture
def traversable_folder() -> Iterator[Path]:
    """A folder user "postgres" can reach (pytest's tmp_path is root-only)."""
    folder = Path(tempfile.mkdtemp(prefix="mlaas-pg-test-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_stop_and_start_keep_the_port_and_the_data() -> None:
    with temporary_postgres(durable=False) as server:
        with psycopg.connect(server.url, autocommit=True) as connection:
            connection.execute("CREATE TABLE kept (x int)")
            connection.execute("INSERT INTO kept VALUES (7)")
        port = server.port
        server.stop()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.url, connect_timeout=2)
        server.start()
        assert server.port == port
        with psycopg.connect(server.url) as connection:
            assert connection.execute("SELECT x FROM kept").fetchall() == [(7,)]


def test_missing_binaries_are_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(postgres_server, "SEARCH_DIRS", str(tmp_path / "nothing" / "*" / "bin"))
    with pytest.raises(PostgresUnavailable, match="initdb and pg_ctl were found neither"):
        PostgresServer(tmp_path / "pg")


def test_a_server_that_cannot_start_says_why(traversable_folder: Path) -> None:
    folder = traversable_folder
    (folder / "data").mkdir()
    (folder / "data" / "PG_VERSION").write_text("15\n")  # looks initialised, but is not
    server = PostgresServer(folder)
    with pytest.raises(PostgresUnavailable, match="pg_ctl start failed"):
        server.start()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the folder to user postgres")
def test_as_root_a_folder_postgres_cannot_enter_is_refused(tmp_path: Path) -> None:
    (tmp_path.parent).chmod(0o700)  # pytest's own folders are root-only already
    with pytest.raises(PostgresUnavailable, match="cannot enter"):
        PostgresServer(tmp_path / "pg").start()
