"""Run a real server in a subprocess, for end-to-end tests and benchmarks.

``ServerProcess`` starts any command that serves HTTP on 127.0.0.1, waits until a health path
answers (failing with the server's own log if it dies or never comes up), and can be killed with
any signal and restarted on the same port. ``LiveServer`` is the ``target-service serve`` process
with its own state directory, so a restart after ``kill(SIGKILL)`` finds the same SQLite state.

    with LiveServer(checkpoint_dir=ckdir, env={"rate_limit": 5}) as server:
        client_id, api_key = admin_create_client(server, "alice", budget=100)
        server.kill(signal.SIGKILL)
        server.restart()

The server's stdout and stderr go to a log file (never to a pipe, which could fill up and stall
the server). Only the standard library and httpx2 are imported here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx2

DEFAULT_ADMIN_TOKEN = "range-admin-token"
LOG_TAIL_CHARS = 6000


class ServerStartError(RuntimeError):
    """The server process died or did not answer its health check in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A command serving HTTP on ``host:port``; started by ``start()``, stopped by ``stop()``."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        port: int,
        host: str = "127.0.0.1",
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        log_path: str | Path | None = None,
        health_path: str = "/health",
        startup_timeout: float = 120.0,
    ) -> None:
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be > 0 seconds, got {startup_timeout}")
        self.argv = list(argv)
        self.host, self.port = host, port
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.health_path = health_path
        self.startup_timeout = startup_timeout
        if log_path is None:
            log_path = Path(tempfile.mkdtemp(prefix="server-log-")) / "server.log"
        self.log_path = Path(log_path)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> ServerProcess:
        if self.running:
            raise RuntimeError(f"server on {self.url} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start #{self.starts + 1}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal does not reach it
            )
        self.starts += 1
        try:
            self.wait_ready()
        except BaseException:
            self.kill(signal.SIGKILL)
            raise
        return self

    def wait_ready(self) -> None:
        """Poll the health path until it answers 200; raise ServerStartError with the log."""
        deadline = time.monotonic() + self.startup_timeout
        with httpx2.Client(base_url=self.url, timeout=5.0) as client:
            while True:
                if self.process is None or self.process.poll() is not None:
                    code = None if self.process is None else self.process.returncode
                    raise ServerStartError(
                        f"server on {self.url} exited with code {code} before it was ready; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    if client.get(self.health_path).status_code == 200:
                        return
                except httpx2.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"server on {self.url} did not answer {self.health_path} within "
                        f"{self.startup_timeout:g} s; log {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(0.2)

    def kill(self, sig: int = signal.SIGKILL, *, timeout: float = 30.0) -> int | None:
        """Send ``sig`` and wait for the process to exit; returns its exit code."""
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(sig)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(timeout=timeout)

    def stop(self, *, timeout: float = 15.0) -> int | None:
        """Graceful stop (SIGTERM), then SIGKILL if it does not exit in ``timeout`` seconds."""
        return self.kill(signal.SIGTERM, timeout=timeout)

    def restart(self) -> ServerProcess:
        """Stop if running, then start again on the same port with the same settings."""
        self.stop()
        return self.start()

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-chars:]

    def __enter__(self) -> ServerProcess:
        return self.start() if not self.running else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def target_env(
    overrides: Mapping[str, Any] | None = None, *, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The process environment with every inherited ``TARGET_*`` variable removed, then
    ``overrides`` applied: keys without the prefix get it (``rate_limit`` -> ``TARGET_RATE_LIMIT``),
    non-string values are JSON-encoded (lists, dicts, numbers, booleans)."""
    env = {
        key: value
        for key, value in (os.environ if base is None else base).items()
        if not key.startswith("TARGET_")
    }
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in (overrides or {}).items():
        name = key.upper()
        if not name.startswith("TARGET_"):
            name = "TARGET_" + name
        env[name] = value if isinstance(value, str) else json.dumps(value)
    return env


class LiveServer(ServerProcess):
    """``target-service serve`` in a subprocess with its own state directory.

    ``env`` holds service settings (see ``target_service.settings``), e.g.
    ``{"rate_limit": 2, "max_batch": 50}``; by default only ``lenet5-mnist`` is hosted, the
    admin token is ``admin_token`` and a missing checkpoint is an error rather than a long
    training run (pass ``{"train_missing": True, "train_epochs": 1}`` to train one).
    """

    def __init__(
        self,
        *,
        checkpoint_dir: str | Path,
        state_dir: str | Path | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        env: Mapping[str, Any] | None = None,
        admin_token: str = DEFAULT_ADMIN_TOKEN,
        models: Sequence[str] = ("lenet5-mnist",),
        log_level: str = "warning",
        log_path: str | Path | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="target-state-"))
        self.admin_token = admin_token
        settings = {"admin_token": admin_token, "models": list(models), "train_missing": False}
        settings.update(env or {})
        port = port or free_port(host)
        argv = [
            sys.executable,
            "-m",
            "target_service.cli",
            "serve",
            "--host",
            host,
            "--port",
            str(port),
            "--state-dir",
            str(self.state_dir),
            "--checkpoint-dir",
            str(self.checkpoint_dir),
            "--log-level",
            log_level,
        ]
        super().__init__(
            argv,
            port=port,
            host=host,
            env=target_env(settings),
            log_path=log_path or self.state_dir.with_name(self.state_dir.name + ".log"),
            startup_timeout=startup_timeout,
        )

    @property
    def state_path(self) -> Path:
        return self.state_dir / "state.sqlite3"

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def client(self, **kwargs: Any) -> httpx2.Client:
        """An httpx2 client for this server (the caller closes it)."""
        kwargs.setdefault("timeout", 60.0)
        return httpx2.Client(base_url=self.url, **kwargs)

    def __enter__(self) -> LiveServer:
        super().__enter__()
        return self


class AdminEndpoint(Protocol):
    """Where a service's admin API answers: a ``LiveServer``, or a picklable stand-in for one
    that worker processes can carry."""

    @property
    def url(self) -> str: ...

    @property
    def admin_headers(self) -> dict[str, str]: ...


def admin_create_client(
    server: AdminEndpoint, name: str, budget: int, *, training_quota: int = 0
) -> tuple[str, str]:
    """Create a client through the admin API; returns ``(client_id, api_key)``."""
    response = httpx2.post(
        f"{server.url}/v1/admin/clients",
        json={"name": name, "budget": budget, "training_quota": training_quota},
        headers=server.admin_headers,
        timeout=30.0,
    )
    if response.status_code != 201:
        raise RuntimeError(
            f"creating client {name!r} failed: {response.status_code} {response.text}"
        )
    body = response.json()
    return body["client_id"], body["api_key"]
