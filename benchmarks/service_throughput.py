"""Throughput and latency of the target service's predict, against a bare FastAPI endpoint.

Starts a real ``target-service serve`` (hosting lenet5-mnist) and the bare baseline of
``benchmarks/_bare_app.py`` under uvicorn, each in its own subprocess on 127.0.0.1, and for
1-image and 100-image requests at 1, 8 and 32 concurrent clients measures images/s, requests/s
and p50/p99 latency. Every client is a closed loop (send, wait for the answer, send again) with
its own connection and, on the service, its own API key with a large budget. The load generator
is one asyncio loop on httpx2 in this process and shares the CPU with the server under test, so
absolute numbers depend on the machine and its load; each cell runs on both servers back to
back, and the overhead ratio (ours / bare throughput, same run) is the figure to compare. After the run the service's ledger must hold exactly the images it
answered.

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
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from mlcore.wire import encode_tensor  # noqa: E402
from target_service.testing import (  # noqa: E402
    LiveServer,
    ServerProcess,
    admin_create_client,
    free_port,
)

MODEL = "lenet5-mnist"
PATH = f"/v1/models/{MODEL}/predict"
BUDGET = 10**10


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
    url: str,
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

    async def client_loop(key: str) -> None:
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

    await asyncio.gather(*(client_loop(key) for key in keys))
    if not latencies:
        raise SystemExit(f"{server}: no request answered in the window ({dict(errors)})")
    ms = np.array(latencies) * 1000
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


def markdown(cells: list[Cell], args: argparse.Namespace) -> str:
    by_key = {(c.server, c.batch, c.clients): c for c in cells}
    lines = [
        f"Service predict vs a bare FastAPI endpoint, {args.duration:g} s per cell, "
        f"{os.cpu_count()} CPUs, 1-min load average {os.getloadavg()[0]:.1f} at the end "
        "(other work shares the machine). "
        f"`python benchmarks/service_throughput.py --duration {args.duration:g}`",
        "",
        "| batch | clients | ours img/s | bare img/s | ours/bare | ours p50 ms | ours p99 ms "
        "| bare p50 ms | bare p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for batch in args.batches:
        for clients in args.clients:
            ours, bare = by_key[("ours", batch, clients)], by_key[("bare", batch, clients)]
            lines.append(
                f"| {batch} | {clients} | {ours.images_per_s:,.0f} | {bare.images_per_s:,.0f} "
                f"| {ours.images_per_s / bare.images_per_s:.2f} | {ours.p50_ms:.1f} "
                f"| {ours.p99_ms:.1f} | {bare.p50_ms:.1f} | {bare.p99_ms:.1f} |"
            )
    return "\n".join(lines) + "\n"


async def measure(
    targets: dict[str, tuple[str, list[str]]], args: argparse.Namespace
) -> tuple[list[Cell], dict[str, int]]:
    """Every (batch, clients) cell on each server back to back, so that both see the same
    background load; returns the cells and the images each server answered in total."""
    cells: list[Cell] = []
    answered = dict.fromkeys(targets, 0)
    for batch in args.batches:
        x = np.random.default_rng(batch).integers(0, 256, (batch, 1, 28, 28), dtype=np.uint8)
        body = json.dumps({"inputs": encode_tensor(x).model_dump()}).encode()
        for clients in args.clients:
            for name, (url, keys) in targets.items():
                cell, images = await run_cell(
                    url,
                    keys[:clients],
                    body,
                    server=name,
                    batch=batch,
                    duration=args.duration,
                    warmup=args.warmup,
                )
                answered[name] += images
                cells.append(cell)
                print(
                    f"{name:>4} batch {batch:>3} x {clients:>2} clients: "
                    f"{cell.images_per_s:>9,.0f} img/s {cell.requests_per_s:>7,.1f} req/s  "
                    f"p50 {cell.p50_ms:7.1f} ms  p99 {cell.p99_ms:7.1f} ms"
                    + (f"  errors {cell.errors}" if cell.errors else ""),
                    flush=True,
                )
    return cells, answered


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per cell [5]")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each cell [1]")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--checkpoint-dir", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--output", type=Path, default=Path("results/service_throughput.json"))
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0:
        parser.error(
            f"--duration must be > 0 and --warmup >= 0, got {args.duration}, {args.warmup}"
        )
    if min(args.batches) < 1 or min(args.clients) < 1:
        parser.error(f"--batches and --clients must be >= 1, got {args.batches}, {args.clients}")

    checkpoint_dir = ensure_checkpoint(args.checkpoint_dir)
    workdir = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    ours = LiveServer(
        checkpoint_dir=checkpoint_dir,
        state_dir=workdir / "state",
        log_path=workdir / "service.log",
        env={"max_batch": max(args.batches)},
    )
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
    with ours, bare:
        keys = [
            admin_create_client(ours, f"bench-{i}", BUDGET)[1] for i in range(max(args.clients))
        ]
        targets = {"ours": (ours.url, keys), "bare": (bare.url, [""] * max(args.clients))}
        cells, answered = asyncio.run(measure(targets, args))
        clients = httpx2.get(f"{ours.url}/v1/admin/clients", headers=ours.admin_headers).json()
        charged = sum(client["queries_used"] for client in clients)
    if charged != answered["ours"]:
        raise SystemExit(f"ledger holds {charged} images but the service answered {answered}")
    print(f"ledger check: {charged:,} images charged == {answered['ours']:,} answered")

    table = markdown(cells, args)
    print()
    print(table)
    bare_by_key = {(c.batch, c.clients): c for c in cells if c.server == "bare"}
    ratios = {
        f"batch{c.batch}-clients{c.clients}": c.images_per_s
        / bare_by_key[(c.batch, c.clients)].images_per_s
        for c in cells
        if c.server == "ours"
    }
    result = {
        "command": "python benchmarks/service_throughput.py " + " ".join(sys.argv[1:]),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "model": MODEL,
        "checkpoint_dir": str(checkpoint_dir),
        "cpus": os.cpu_count(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "python": platform.python_version(),
        "cells": [asdict(cell) for cell in cells],
        "overhead_ratio_ours_over_bare": ratios,
        "ledger_images_charged": charged,
        "images_answered": answered["ours"],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(table)
    print(f"wrote {args.output} and {args.output.with_suffix('.md')}")


if __name__ == "__main__":
    main()
