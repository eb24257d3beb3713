"""``target-service cluster``: PostgreSQL, N service replicas and one detection worker on one
machine, started together and stopped together.

- **Database.** A throwaway PostgreSQL (``postgres_server.PostgresServer``) in
  ``DIR/postgres`` unless a ``--database-url`` is given; it keeps its data there, so a cluster
  started again on the same folder finds its clients and ledger.
- **Replicas.** ``target-service serve`` on ports P, P+1, ..., every one on the same database and
  the same state directory (uploaded datasets and trained models are files there, and any
  replica's training worker may run a job: jobs are claimed with a lease in the database).
  The first replica starts alone (it creates the schema and trains a missing checkpoint), the
  others after it.
- **Detection.** ``TARGET_DETECTION_MODE=worker`` for every replica, and one
  ``target-service detect``: inline detectors keep a client's stream in one process's memory,
  which replicas cannot share.
- **Admin token.** TARGET_ADMIN_TOKEN when set; otherwise a new random one, written to
  ``DIR/admin-token`` (owner-only) and never printed.
- **Status file.** ``DIR/cluster.json`` says the URLs, the process ids and whether every part is
  up (``ready``); it is removed when the cluster stops.
- **Stopping.** SIGTERM or SIGINT (Ctrl-C) stops the detection worker and the replicas
  (SIGTERM, then SIGKILL after a grace period) and then PostgreSQL, so nothing is left running.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from target_service.postgres_server import PostgresServer
from target_service.settings import MIN_ADMIN_TOKEN_CHARS, Settings
from target_service.testing import ServerProcess
from target_service.zoo import checkpoint_path, load_hosted

logger = logging.getLogger(__name__)

STATUS_FILE = "cluster.json"
TOKEN_FILE = "admin-token"
DETECTOR_READY = b" watching "  # "detection worker <token> watching [...]": its models are loaded


class ClusterError(RuntimeError):
    """A part of the cluster could not start; the message names it and where its log is."""


def shared_state_problems(settings: Settings) -> list[str]:
    """Why several processes serving these settings would disagree: what is kept in one
    process's memory rather than in the database (empty: nothing)."""
    problems = []
    watched = [name for name in settings.models if settings.detectors.get(name) != {}]
    if watched and settings.detection_mode == "inline":
        problems.append(
            f"inline detectors keep each client's stream in one process's memory ({watched} "
            "are watched): set TARGET_DETECTION_MODE=worker and run `target-service detect`"
        )
    if settings.input_defenses:
        problems.append(
            "input defences (TARGET_INPUT_DEFENSES) count each client's rejected images in one "
            "process's memory: serve them from a single process"
        )
    return problems


def prepare_shared_start(settings: Settings) -> None:
    """Before several processes start on ``settings``: refuse settings they would disagree on
    (ValueError naming them), and train missing checkpoints once, here, rather than in each."""
    problems = shared_state_problems(settings)
    if problems:
        raise ValueError("; ".join(problems))
    for name in settings.models:
        if settings.train_missing and not checkpoint_path(settings.checkpoint_dir, name).exists():
            load_hosted(
                name,
                settings.checkpoint_dir,
                data_root=settings.data_root,
                epochs=settings.train_epochs,
                detectors=settings.detectors.get(name),
                calibration_clients=settings.calibration_clients,
            )


class Cluster:
    """PostgreSQL (unless ``database_url``), ``replicas`` servers and one detection worker."""

    def __init__(
        self,
        state_dir: str | Path,
        *,
        replicas: int,
        port: int,
        host: str = "127.0.0.1",
        database_url: str | None = None,
        checkpoint_dir: str | Path | None = None,
        workers_per_replica: int = 1,
        log_level: str = "info",
        startup_timeout: float = 600.0,
    ) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        if not 1 <= port <= 65535 - replicas + 1:
            raise ValueError(f"ports {port}..{port + replicas - 1} must lie in 1..65535")
        self.state_dir = Path(state_dir).resolve()
        self.replicas_wanted = replicas
        self.port, self.host = port, host
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir).resolve()
        self.workers_per_replica = workers_per_replica
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.env = dict(os.environ)
        self.postgres: PostgresServer | None = None
        self.database_url = database_url
        self.replicas: list[ServerProcess] = []
        self.detector: subprocess.Popen[bytes] | None = None
        self.admin_token_source = ""

    @property
    def urls(self) -> list[str]:
        return [replica.url for replica in self.replicas]

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def start(self) -> Cluster:
        """Start every part in order; on any failure stop what started and raise."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        if self.database_url is None:
            if os.geteuid() == 0:  # PostgreSQL runs as user postgres: it must pass through
                os.chmod(self.state_dir, self.state_dir.stat().st_mode | 0o001)
            self.postgres = PostgresServer(self.state_dir / "postgres").start()
            self.database_url = self.postgres.url
        self.env.update(
            TARGET_DATABASE_URL=self.database_url,
            TARGET_STATE_DIR=str(self.state_dir),
            TARGET_DETECTION_MODE="worker",
            TARGET_ADMIN_TOKEN=self._admin_token(),
            PYTHONUNBUFFERED="1",
        )
        if self.checkpoint_dir is not None:
            self.env["TARGET_CHECKPOINT_DIR"] = str(self.checkpoint_dir)
        problems = shared_state_problems(self.settings())
        if problems:
            raise ClusterError("; ".join(problems))
        self.replicas = [self._replica(index) for index in range(self.replicas_wanted)]
        self.replicas[0].start()  # alone: it migrates the schema and trains a missing model
        for replica in self.replicas[1:]:
            self._launch(replica)
        for replica in self.replicas[1:]:
            self._wait(replica)
        self._start_detector()
        self.write_status(ready=True)

    def settings(self) -> Settings:
        """The replicas' settings: TARGET_* variables with the cluster's own on top."""
        overrides: dict[str, Any] = {"state_dir": self.state_dir, "detection_mode": "worker"}
        if self.checkpoint_dir is not None:
            overrides["checkpoint_dir"] = self.checkpoint_dir
        return Settings(**overrides)

    def _admin_token(self) -> str:
        token = self.env.get("TARGET_ADMIN_TOKEN")
        if token:
            self.admin_token_source = "TARGET_ADMIN_TOKEN"
            return token
        path = self.state_dir / TOKEN_FILE
        if path.exists():
            token = path.read_text().strip()
        if not token or len(token) < MIN_ADMIN_TOKEN_CHARS:
            token = secrets.token_hex(16)
            path.touch(mode=0o600)
            path.write_text(token + "\n")
        self.admin_token_source = str(path)
        return token

    def _replica(self, index: int) -> ServerProcess:
        port = self.port + index
        argv = [
            sys.executable, "-m", "target_service.cli", "serve",
            "--host", self.host, "--port", str(port),
            "--workers", str(self.workers_per_replica), "--log-level", self.log_level,
        ]  # fmt: skip
        return ServerProcess(
            argv,
            port=port,
            host=self.host,
            env=self.env,
            log_path=self.log_dir / f"replica-{index}.log",
            startup_timeout=self.startup_timeout,
        )

    @staticmethod
    def _launch(replica: ServerProcess) -> None:
        """Start a replica without waiting for it (the others start while it loads)."""
        with replica.log_path.open("ab") as log:
            replica.process = subprocess.Popen(
                replica.argv,
                env=replica.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        replica.starts += 1

    @staticmethod
    def _wait(replica: ServerProcess) -> None:
        try:
            replica.wait_ready()
        except Exception as exc:
            raise ClusterError(str(exc)) from None

    def _start_detector(self) -> None:
        """Start ``target-service detect`` and wait until it says it is watching (it logs at
        info level to its own file whatever ``log_level`` says)."""
        log_path = self.log_dir / "detect.log"
        start_offset = log_path.stat().st_size if log_path.exists() else 0
        argv = [
            sys.executable, "-m", "target_service.cli", "detect",
            "--state-dir", str(self.state_dir), "--log-level", "info",
        ]  # fmt: skip
        with log_path.open("ab") as log:
            self.detector = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        while self.detector.poll() is None and time.monotonic() < deadline:
            with log_path.open("rb") as log:
                log.seek(start_offset)
                if DETECTOR_READY in log.read():
                    return
            time.sleep(0.2)
        tail = log_path.read_text(errors="replace")[-4000:]
        code = self.detector.poll()
        state = f"exited with code {code}" if code is not None else "did not start in time"
        raise ClusterError(f"the detection worker {state}; log {log_path}:\n{tail}")

    def status(self, *, ready: bool) -> dict[str, Any]:
        return {
            "ready": ready,
            "pid": os.getpid(),
            "urls": self.urls,
            "replica_pids": [
                replica.process.pid if replica.process else None for replica in self.replicas
            ],
            "detector_pid": self.detector.pid if self.detector else None,
            "postgres": None if self.postgres is None else str(self.postgres.folder),
            "admin_token": self.admin_token_source,
            "logs": str(self.log_dir),
        }

    def write_status(self, *, ready: bool) -> None:
        path = self.state_dir / STATUS_FILE
        path.write_text(json.dumps(self.status(ready=ready), indent=2) + "\n")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the detection worker, then the replicas, then PostgreSQL (each part once)."""
        (self.state_dir / STATUS_FILE).unlink(missing_ok=True)
        if self.detector is not None and self.detector.poll() is None:
            self.detector.send_signal(signal.SIGTERM)
        stoppers = [
            threading.Thread(target=replica.stop, kwargs={"timeout": timeout})
            for replica in self.replicas
        ]
        for thread in stoppers:  # in parallel: each may take its grace period
            thread.start()
        for thread in stoppers:
            thread.join()
        if self.detector is not None:
            try:
                self.detector.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.detector.kill()
                self.detector.wait()
        if self.postgres is not None:
            self.postgres.stop()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class Stopped(Exception):
    """SIGTERM or SIGINT reached the cluster."""


def run_cluster(cluster: Cluster, echo: Callable[..., Any], poll: float = 1.0) -> None:
    """Start ``cluster``, say where it is, and keep it up until SIGTERM or SIGINT; a part that
    dies meanwhile is reported (the others go on serving), not restarted."""

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        cluster.start()
        where = f"in {cluster.postgres.folder}" if cluster.postgres else "given by --database-url"
        echo(f"PostgreSQL {where}")
        for index, url in enumerate(cluster.urls):
            echo(f"replica {index}: {url}")
        echo(f"detection worker: pid {cluster.detector.pid if cluster.detector else '-'}")
        echo(f"admin token: {cluster.admin_token_source}")
        echo(f"logs: {cluster.log_dir}; Ctrl-C or SIGTERM stops everything")
        reported: set[int] = set()
        while True:
            _report_dead(cluster, reported, echo)
            threading.Event().wait(poll)
    except Stopped as signal_name:
        echo(f"{signal_name}: stopping the cluster")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop, even on a second signal
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cluster.stop()
        echo("cluster stopped")


def _report_dead(cluster: Cluster, reported: set[int], echo: Any) -> None:
    processes = [r.process for r in cluster.replicas if r.process] + (
        [cluster.detector] if cluster.detector else []
    )
    for process in processes:
        if process.poll() is not None and process.pid not in reported:
            reported.add(process.pid)
            echo(f"process {process.pid} exited with code {process.returncode}", err=True)
