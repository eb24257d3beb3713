"""A throwaway PostgreSQL server for tests, benchmarks and ``target-service cluster``.

``PostgresServer(folder).start()`` runs the machine's own PostgreSQL binaries: ``initdb`` into
``folder/data`` (once), then ``pg_ctl start`` listening on 127.0.0.1 only (no Unix socket) on a
free port, waits until it accepts connections, creates the database and gives its ``url``.
``stop()`` stops it (``pg_ctl stop -m fast``: clients are disconnected, committed work is kept);
``start()`` again restarts the same data on the same port, which is how the fault tests restart
the database under load. It is a context manager too.

PostgreSQL refuses to run as root, so when this process is root the folder is handed to the
unprivileged system user ``postgres`` and the binaries run through ``runuser -u postgres --``.
Authentication is ``trust`` for the superuser ``postgres`` over 127.0.0.1: the server is only
for this machine and lives as long as the test session or the cluster.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql

from target_service.testing import free_port

SUPERUSER = "postgres"
RUN_AS = "postgres"  # the system user that owns the data when this process is root
SEARCH_DIRS = "/usr/lib/postgresql/*/bin"  # Debian's layout, when the binaries are not on PATH


class PostgresUnavailable(RuntimeError):
    """PostgreSQL could not be found, initialised or started; the message says why."""


def find_binaries() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``: PATH first, then the newest Debian one."""
    on_path = [shutil.which(name) for name in ("initdb", "pg_ctl")]
    if all(on_path):
        return Path(os.path.realpath(str(on_path[0]))).parent
    for folder in sorted(glob.glob(SEARCH_DIRS), key=_major_version, reverse=True):
        if all((Path(folder) / name).is_file() for name in ("initdb", "pg_ctl")):
            return Path(folder)
    raise PostgresUnavailable(
        f"PostgreSQL binaries initdb and pg_ctl were found neither on PATH nor in {SEARCH_DIRS};"
        " install PostgreSQL (Debian: apt-get install postgresql)"
    )


def _major_version(folder: str) -> int:
    version = Path(folder).parent.name
    return int(version) if version.isdigit() else 0


class PostgresServer:
    """One PostgreSQL server in ``folder`` with one database, ``database``.

    ``durable=False`` turns off fsync and full-page writes: faster for tests, and a clean
    ``stop()`` still keeps every committed row; only a machine crash would lose data.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        database: str = "mlaas",
        port: int | None = None,
        durable: bool = True,
        max_connections: int = 300,
        start_timeout: float = 60.0,
    ) -> None:
        self.folder = Path(folder).resolve()
        self.data_dir = self.folder / "data"
        self.log_path = self.folder / "postgres.log"
        self.database = database
        self.port = port or free_port()
        self.durable = durable
        self.max_connections = max_connections
        self.start_timeout = start_timeout
        self.bin_dir = find_binaries()
        self._as_root = os.geteuid() == 0

    @property
    def url(self) -> str:
        """The database's URL (no password: trust authentication on 127.0.0.1)."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresServer:
        """Initialise the folder if needed, start the server, wait for it, create the database."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            self._hand_folder_to_postgres()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                "initdb",
                "--pgdata", str(self.data_dir),
                "--username", SUPERUSER,
                "--auth", "trust",
                "--encoding", "UTF8",
                "--no-instructions",
            )  # fmt: skip
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-c port={self.port}",
            "-c unix_socket_directories=''",
            f"-c max_connections={self.max_connections}",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c full_page_writes=off", "-c synchronous_commit=off"]
        self._run(
            "pg_ctl", "start",
            "--pgdata", str(self.data_dir),
            "--log", str(self.log_path),
            "--options", " ".join(options),
            "--wait", "--timeout", str(int(self.start_timeout)),
        )  # fmt: skip
        self._wait_until_accepting()
        self.create_database(self.database)
        return self

    def stop(self) -> None:
        """Stop the server if it runs (fast shutdown: sessions end, committed work stays)."""
        if not (self.data_dir / "postmaster.pid").exists():
            return
        self._run("pg_ctl", "stop", "--pgdata", str(self.data_dir), "--mode", "fast", "--wait")

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals --------------------------------------------------------------------------
    def _hand_folder_to_postgres(self) -> None:
        """PostgreSQL will not run as root: the folder becomes the ``postgres`` user's. Its
        parents must let that user through, so a folder under a root-only one is an error."""
        try:
            user = pwd.getpwnam(RUN_AS)
        except KeyError:
            raise PostgresUnavailable(
                f"running as root, and there is no system user {RUN_AS!r} to run PostgreSQL as"
            ) from None
        for parent in self.folder.parents:
            if not os.stat(parent).st_mode & 0o001:
                raise PostgresUnavailable(
                    f"{self.folder} is inside {parent}, which user {RUN_AS!r} cannot enter;"
                    " give PostgreSQL a folder under a world-traversable one such as /tmp"
                )
        for path in [self.folder, *self.folder.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
        os.chmod(self.folder, 0o700)

    def _run(self, binary: str, *args: str) -> None:
        command = [str(self.bin_dir / binary), *args]
        if self._as_root:
            command = ["runuser", "-u", RUN_AS, "--", *command]
        result = subprocess.run(
            command, capture_output=True, text=True, cwd=self.folder, check=False
        )
        if result.returncode != 0:
            raise PostgresUnavailable(
                f"{binary} {args[0]} failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()}{self._log_tail()}"
            )

    def _log_tail(self, lines: int = 20) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\nserver log ({}):\n{}".format(self.log_path, "\n".join(tail)) if tail else ""

    def _wait_until_accepting(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                with psycopg.connect(self.url_for("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise PostgresUnavailable(
                        f"PostgreSQL on 127.0.0.1:{self.port} did not accept connections within "
                        f"{self.start_timeout:g} s: {exc}{self._log_tail()}"
                    ) from exc
                time.sleep(0.1)

    def create_database(self, name: str) -> str:
        """Create the database ``name`` unless it exists; its URL (tests take one each)."""
        with psycopg.connect(self.url_for("postgres"), autocommit=True) as connection:
            exists = connection.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if exists is None:
                connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)


@contextmanager
def temporary_postgres(prefix: str = "mlaas-pg-", **options: Any) -> Iterator[PostgresServer]:
    """A started server in a new folder under the system's temporary one (which user
    ``postgres`` can enter, unlike pytest's), stopped and deleted at the end."""
    folder = tempfile.mkdtemp(prefix=prefix)
    server = PostgresServer(folder, **options)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
