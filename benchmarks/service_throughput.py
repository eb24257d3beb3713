"""Throughput and latency of the target service's predict, against a bare FastAPI endpoint.

Runs one configuration of the service after another, and the bare baseline of
``benchmarks/_bare_app.py`` (uvicorn, always up) back to back with each, every server in its own
subprocesses on 127.0.0.1:

- ``sqlite-inline``: one ``target-service serve`` on SQLite, detectors in the request;
- ``pg1-inline``: the same on PostgreSQL;
- ``pg1-worker``, ``pg2-worker``, ``pg4-worker``: ``target-service cluster`` with 1, 2 and 4
  replicas on one PostgreSQL and one detection worker (``TARGET_DETECTION_MODE=worker``).

For 1-image and 100-image requests at each ``--clients`` count it measures images/s, requests/s
and p50/p99 latency. Every client is a closed loop (send, wait for the answer, send again) with
its own connection and, on the service, its own API key with a large budget; clients are spread
over the replicas round-robin. The load generator is one asyncio loop on httpx2 in this process
and shares the CPU with the servers, so absolute numbers depend on the machine and its load; the
ratio to the bare endpoint measured just before is the figure to compare.

With the detection worker, the detection lag of a query is the time from its charge (its ledger
row's ``created_at``) to the first moment its stream's cursor (``detection_leases``) is seen at or
past it, polled every ``--lag-poll`` s during the 1-image cells (a benchmark-only read of the
database). After each configuration its ledger must hold exactly the images it answered.

    python benchmarks/service_throughput.py --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from mlcore.wire import encode_tensor  # noqa: E402
from target_service.cluster import Cluster  # noqa: E402
from target_service.postgres_server import PostgresServer  # noqa: E402
from target_service.testing import (  # noqa: E402
    DEFAULT_ADMIN_TOKEN,
    LiveServer,
    ServerProcess,
    admin_create_client,
    free_port,
    target_env,
)

MODEL = "lenet5-mnist"
PATH = f"/v1/models/{MODEL}/predict"
BUDGET = 10**9  # PostgreSQL keeps budgets in a 32-bit INTEGER


@dataclass
class Cell:
    server: str
    batch: int
    clients: int
    seconds: float
    requests: int
    images_per_s: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]


async def run_cell(
    urls: list[str],
    keys: list[str],
    body: bytes,
    *,
    server: str,
    batch: int,
    duration: float,
    warmup: float,
) -> tuple[Cell, int]:
    """One closed-loop run; returns the cell and every image answered (warm-up included)."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    answered = 0
    start = time.perf_counter()
    measure_from, end = start + warmup, start + warmup + duration

    async def client_loop(key: str, url: str) -> None:
        nonlocal answered
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        async with httpx2.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
            while time.perf_counter() < end:
                sent = time.perf_counter()
                try:
                    response = await http.post(PATH, content=body)
                except httpx2.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                done = time.perf_counter()
                if response.status_code != 200:
                    errors[str(response.status_code)] += 1
                    continue
                answered += batch
                if measure_from <= done <= end:
                    latencies.append(done - sent)

    await asyncio.gather(
        *(client_loop(key, urls[index % len(urls)]) for index, key in enumerate(keys))
    )
    # no answer inside the window (a request slower than the cell): NaN latencies, 0 throughput
    ms = np.array(latencies or [np.nan]) * 1000
    cell = Cell(
        server=server,
        batch=batch,
        clients=len(keys),
        seconds=duration,
        requests=len(latencies),
        images_per_s=len(latencies) * batch / duration,
        requests_per_s=len(latencies) / duration,
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
        errors=dict(errors),
    )
    return cell, answered


def ensure_checkpoint(checkpoint_dir: Path) -> Path:
    if (checkpoint_dir / f"{MODEL}.pt").exists():
        return checkpoint_dir
    from target_service.zoo import TARGETS, train_target

    target = Path(tempfile.mkdtemp(prefix="bench-checkpoints-"))
    print(f"no {MODEL}.pt in {checkpoint_dir}: training a 1-epoch one into {target}")
    train_target(TARGETS[MODEL], target, epochs=1)
    return target


CONFIGS = ["sqlite-inline", "pg1-inline", "pg1-worker", "pg2-worker", "pg4-worker"]


@dataclass
class Target:
    """One running configuration: where its clients go and how to read its state."""

    name: str
    urls: list[str]
    keys: list[str]
    admin_url: str
    database_url: str | None  # PostgreSQL (None: SQLite)
    detection: str  # "inline" or "worker"


@contextmanager
def running(
    config: str, args: argparse.Namespace, checkpoint_dir: Path, workdir: Path, postgres: Any
) -> Iterator[Target]:
    """Start one configuration, open one client per load-generator client, stop it after."""
    folder = workdir / config
    settings: dict[str, Any] = {"max_batch": max(args.batches)}
    database_url = None
    if config.startswith("pg"):
        database_url = postgres.create_database(config.replace("-", "_"))
        settings["database_url"] = database_url
    if config.endswith("inline"):
        server = LiveServer(
            checkpoint_dir=checkpoint_dir,
            state_dir=folder / "state",
            log_path=folder / "service.log",
            env=settings,
            startup_timeout=600,
        )
        with server:
            keys = [
                admin_create_client(server, f"bench-{i}", BUDGET)[1]
                for i in range(max(args.clients))
            ]
            yield Target(config, [server.url], keys, server.url, database_url, "inline")
        return
    replicas = int(config[2])
    environment = target_env(
        {**settings, "admin_token": DEFAULT_ADMIN_TOKEN, "models": [MODEL], "train_missing": False}
    )
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environment)  # the cluster's processes read their settings from here
    try:
        cluster = Cluster(
            folder / "state", replicas=replicas, port=free_port(), database_url=database_url,
            checkpoint_dir=checkpoint_dir, log_level="warning",
        )  # fmt: skip
        with cluster:
            headers = {"Authorization": f"Bearer {DEFAULT_ADMIN_TOKEN}"}
            keys = [
                httpx2.post(
                    f"{cluster.urls[0]}/v1/admin/clients",
                    json={"name": f"bench-{i}", "budget": BUDGET},
                    headers=headers,
                    timeout=60,
                ).json()["api_key"]
                for i in range(max(args.clients))
            ]
            yield Target(config, cluster.urls, keys, cluster.urls[0], database_url, "worker")
    finally:
        os.environ.clear()
        os.environ.update(saved)


def charged_images(target: Target) -> int:
    headers = {"Authorization": f"Bearer {DEFAULT_ADMIN_TOKEN}"}
    clients = httpx2.get(f"{target.admin_url}/v1/admin/clients", headers=headers, timeout=60)
    return sum(client["queries_used"] for client in clients.json())


class LagProbe:
    """Polls the detection cursors while a cell runs; afterwards, each query's detection lag
    (its charge to the first poll that saw its stream's cursor at or past it)."""

    def __init__(self, database_url: str, poll: float) -> None:
        import psycopg

        self.connection = psycopg.connect(database_url, autocommit=True)
        self.poll = poll
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rows = self.connection.execute(
                "SELECT stream, through_entry FROM detection_leases WHERE model = %s", (MODEL,)
            ).fetchall()
            self.samples.append((time.time(), {stream: int(through) for stream, through in rows}))
            self._stop.wait(self.poll)

    def __enter__(self) -> LagProbe:
        self.started = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.ended = time.time()
        self._last_entry = self.connection.execute("SELECT MAX(entry_id) FROM ledger").fetchone()
        settle = time.monotonic() + 10.0  # let the worker finish the queue before stopping
        while time.monotonic() < settle and not self._caught_up():
            time.sleep(self.poll)
        self._stop.set()
        self._thread.join()

    def _caught_up(self) -> bool:
        if not self.samples:
            return False
        (last,) = self._last_entry or (None,)
        rows = self.connection.execute(
            "SELECT client_id, MAX(entry_id) FROM ledger WHERE entry_id <= %s GROUP BY client_id",
            (last or 0,),
        ).fetchall()
        seen = self.samples[-1][1]
        return all(seen.get(client, 0) >= entry for client, entry in rows)

    def lags(self) -> tuple[list[float], int]:
        """The lags of the queries charged during the cell, and how many never got processed."""
        rows = self.connection.execute(
            "SELECT entry_id, client_id, created_at FROM ledger WHERE created_at BETWEEN %s AND %s",
            (self.started, self.ended),
        ).fetchall()
        self.connection.close()
        lags, missing = [], 0
        for entry_id, client_id, charged_at in rows:
            seen_at = next(
                (t for t, cursors in self.samples if cursors.get(client_id, 0) >= entry_id), None
            )
            if seen_at is None:
                missing += 1
            else:
                lags.append(max(0.0, seen_at - charged_at))
        return lags, missing


async def measure(
    target: Target, bare_url: str, args: argparse.Namespace
) -> tuple[list[Cell], int, dict[str, Any]]:
    """Every (batch, clients) cell on the bare endpoint and then on ``target``, back to back so
    that both see the same background load; returns the cells, the images ``target`` answered,
    and the detection lag of its 1-image cells."""
    cells: list[Cell] = []
    answered = 0
    lag: dict[str, Any] = {}
    for batch in args.batches:
        x = np.random.default_rng(batch).integers(0, 256, (batch, 1, 28, 28), dtype=np.uint8)
        body = json.dumps({"inputs": encode_tensor(x).model_dump()}).encode()
        for clients in args.clients:
            for name, urls, keys in (
                ("bare", [bare_url], [""] * clients),
                (target.name, target.urls, target.keys[:clients]),
            ):
                probe = (
                    LagProbe(target.database_url, args.lag_poll)
                    if name == target.name and target.detection == "worker" and batch == 1
                    and target.database_url
                    else None
                )  # fmt: skip
                with probe or nullcontext():
                    cell, images = await run_cell(
                        urls, keys, body, server=name, batch=batch,
                        duration=args.duration, warmup=args.warmup,
                    )  # fmt: skip
                if probe is not None:
                    lags, missing = probe.lags()
                    lag[f"clients{clients}"] = {
                        "queries": len(lags) + missing,
                        "never_processed": missing,
                        "p50_s": float(np.percentile(lags, 50)) if lags else None,
                        "p99_s": float(np.percentile(lags, 99)) if lags else None,
                        "max_s": max(lags) if lags else None,
                    }
                if name == target.name:
                    answered += images
                cells.append(cell)
                print(
                    f"{name:>13} batch {batch:>3} x {clients:>2} clients: "
                    f"{cell.images_per_s:>9,.0f} img/s {cell.requests_per_s:>7,.1f} req/s  "
                    f"p50 {cell.p50_ms:7.1f} ms  p99 {cell.p99_ms:7.1f} ms"
                    + (f"  errors {cell.errors}" if cell.errors else "")
                    + (f"  lag {lag[f'clients{clients}']}" if probe is not None else ""),
                    flush=True,
                )
    return cells, answered, lag


def ratio(ours: float, bare: float) -> str:
    """ours / bare, or "-" when the bare endpoint answered nothing in its window."""
    return f"{ours / bare:.2f}" if bare > 0 else "-"


def markdown(
    runs: dict[str, tuple[list[Cell], dict[str, Any]]], args: argparse.Namespace, load: float
) -> str:
    """The headline table (the issue's aims at ``--headline-clients`` clients) and every cell."""
    k = args.headline_clients
    lines = [
        f"Service predict vs a bare FastAPI endpoint measured just before it, {args.duration:g} s "
        f"per cell after {args.warmup:g} s of warm-up, {os.cpu_count()} CPUs, 1-min load "
        f"average {load:.1f} at the end (other work shares the machine). "
        f"`python benchmarks/service_throughput.py {' '.join(sys.argv[1:])}`",
        "",
        f"| configuration | req/s, 1 image x {k} clients | / bare | img/s, 100 images x {k} "
        f"clients | / bare | p50 ms, {k} x 1 | p99 ms, {k} x 1 | detection lag p99 s, {k} x 1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for config, (cells, lag) in runs.items():
        cell = {(c.server, c.batch, c.clients): c for c in cells}
        one, bare_one = cell.get((config, 1, k)), cell.get(("bare", 1, k))
        many, bare_many = cell.get((config, 100, k)), cell.get(("bare", 100, k))
        probe = lag.get(f"clients{k}")
        lag_text = "inline (0)" if config.endswith("inline") else "-"
        if probe and probe["p99_s"] is not None:
            lag_text = f"{probe['p99_s']:.3f}"
            if probe["never_processed"]:
                lag_text += f" ({probe['never_processed']} of {probe['queries']} never processed)"
        lines.append(
            f"| {config} | "
            + (f"{one.requests_per_s:,.0f} | {ratio(one.requests_per_s, bare_one.requests_per_s)}"
               if one and bare_one else "- | -")
            + " | "
            + (f"{many.images_per_s:,.0f} | {ratio(many.images_per_s, bare_many.images_per_s)}"
               if many and bare_many else "- | -")
            + " | "
            + (f"{one.p50_ms:.1f} | {one.p99_ms:.1f}" if one else "- | -")
            + f" | {lag_text} |"
        )  # fmt: skip
    lines += [
        "",
        "| configuration | batch | clients | img/s | req/s | p50 ms | p99 ms | bare img/s "
        "| bare p50 ms | bare p99 ms | / bare |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config, (cells, _) in runs.items():
        bare = {(c.batch, c.clients): c for c in cells if c.server == "bare"}
        for c in cells:
            if c.server != config:
                continue
            b = bare[(c.batch, c.clients)]
            lines.append(
                f"| {config} | {c.batch} | {c.clients} | {c.images_per_s:,.0f} "
                f"| {c.requests_per_s:,.1f} | {c.p50_ms:.1f} | {c.p99_ms:.1f} "
                f"| {b.images_per_s:,.0f} | {b.p50_ms:.1f} | {b.p99_ms:.1f} "
                f"| {ratio(c.images_per_s, b.images_per_s)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per cell [5]")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each cell [1]")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--clients", type=int, nargs="+", default=[8])
    parser.add_argument("--headline-clients", type=int, default=8)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=CONFIGS)
    parser.add_argument("--lag-poll", type=float, default=0.02, help="cursor poll period [0.02]")
    parser.add_argument("--checkpoint-dir", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--output", type=Path, default=Path("results/service_throughput.json"))
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0:
        parser.error(
            f"--duration must be > 0 and --warmup >= 0, got {args.duration}, {args.warmup}"
        )
    if min(args.batches) < 1 or min(args.clients) < 1:
        parser.error(f"--batches and --clients must be >= 1, got {args.batches}, {args.clients}")
    if args.headline_clients not in args.clients:
        parser.error(f"--headline-clients {args.headline_clients} is not in --clients")

    checkpoint_dir = ensure_checkpoint(args.checkpoint_dir)
    workdir = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    bare_port = free_port()
    bare = ServerProcess(
        [
            sys.executable, "-m", "uvicorn", "_bare_app:app",
            "--app-dir", str(Path(__file__).resolve().parent),
            "--host", "127.0.0.1", "--port", str(bare_port), "--log-level", "warning",
        ],
        port=bare_port,
        log_path=workdir / "bare.log",
    )  # fmt: skip
    load_before = os.getloadavg()[0]
    runs: dict[str, tuple[list[Cell], dict[str, Any]]] = {}
    ledger: dict[str, dict[str, int]] = {}
    postgres = None
    if any(config.startswith("pg") for config in args.configs):
        # durable=False: no fsync, as SQLite's WAL with synchronous=NORMAL does not fsync a commit
        postgres = PostgresServer(tempfile.mkdtemp(prefix="bench-pg-"), durable=False).start()
    try:
        with bare:
            for config in args.configs:
                with running(config, args, checkpoint_dir, workdir, postgres) as target:
                    cells, answered, lag = asyncio.run(measure(target, bare.url, args))
                    charged = charged_images(target)
                if charged != answered:
                    raise SystemExit(
                        f"{config}: the ledger holds {charged} images, the service answered "
                        f"{answered}"
                    )
                print(f"{config}: ledger check, {charged:,} images charged == answered")
                runs[config] = (cells, lag)
                ledger[config] = {"charged": charged, "answered": answered}
    finally:
        if postgres is not None:
            postgres.stop()
    load_after = os.getloadavg()[0]
    table = markdown(runs, args, load_after)
    print()
    print(table)
    result = {
        "command": "python benchmarks/service_throughput.py " + " ".join(sys.argv[1:]),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "model": MODEL,
        "checkpoint_dir": str(checkpoint_dir),
        "cpus": os.cpu_count(),
        "load_average_1min": {"before": load_before, "after": load_after},
        "python": platform.python_version(),
        "configurations": {
            config: {
                "cells": [asdict(cell) for cell in cells],
                "detection_lag": lag,
                "ledger": ledger[config],
            }
            for config, (cells, lag) in runs.items()
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(table)
    print(f"wrote {args.output} and {args.output.with_suffix('.md')}")


if __name__ == "__main__":
    main()
