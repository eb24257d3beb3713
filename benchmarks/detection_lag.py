"""How late does ``block`` take effect when the detectors run off the request path?

Starts ``target-service serve`` with ``TARGET_DETECTION_MODE=worker`` and the ``block`` policy,
one ``target-service detect`` worker beside it, and ``--clients`` attackers sending the e2e
tests' JbDA-like stream (fixed-size sign steps, which PRADA flags) at once, in requests of
``--request-size`` images, until they are refused. Per alarm it reports the lag, from the charge
of the request holding the alarming query (its ledger row) to the alarm row, and the queries the
attacker was still answered after its alarming query (what the lag gave away; inline detection
gives away none).

    python benchmarks/detection_lag.py
    python benchmarks/detection_lag.py --clients 8 --poll 0.05

Writes results/detection_lag.json and results/detection_lag.md. Reads the ledger from the SQLite
state file directly (a benchmark-only read).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlcore.wire import encode_tensor  # noqa: E402
from target_service.testing import LiveServer, admin_create_client, target_env  # noqa: E402
from target_service.zoo import TARGETS, train_target  # noqa: E402
from tests.e2e.test_detection_e2e import synthetic_steps  # noqa: E402

MODEL = "lenet5-mnist"


def attack(server: LiveServer, key: str, batches: list[np.ndarray], out: dict[str, Any]) -> None:
    """Send until refused; ``out`` gets the images answered and the refusal's code."""
    answered = 0
    with server.client() as http:
        for x in batches:
            response = http.post(
                f"/v1/models/{MODEL}/predict",
                json={"inputs": encode_tensor(x).model_dump()},
                headers={"Authorization": f"Bearer {key}"},
            )
            if response.status_code != 200:
                out["refused"] = response.json()["error"]["code"]
                break
            answered += len(x)
    out["answered"] = answered


def charge_times(state_path: Path, client_id: str) -> list[tuple[int, float]]:
    """(cumulative images, created_at) of a client's ledger rows on MODEL, in order."""
    with sqlite3.connect(f"file:{state_path}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT images, created_at FROM ledger WHERE client_id = ? AND model = ?"
            " ORDER BY entry_id",
            (client_id, MODEL),
        ).fetchall()
    total, out = 0, []
    for images, created in rows:
        total += images
        out.append((total, created))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batches", type=int, default=80, help="most requests per attacker")
    parser.add_argument("--request-size", type=int, default=10)
    parser.add_argument("--poll", type=float, default=0.2, help="the worker's idle poll (s)")
    parser.add_argument("--checkpoint-dir", type=Path, default=ROOT / "results" / "checkpoints")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "detection_lag.json")
    args = parser.parse_args()
    if not (args.checkpoint_dir / f"{MODEL}.pt").exists():
        train_target(TARGETS[MODEL], args.checkpoint_dir)
    settings = {
        "detection_mode": "worker",
        "detectors": {MODEL: {"prada": {"delta": 0.95}}},
        "alarm_policies": {MODEL: "block"},
        "checkpoint_dir": str(args.checkpoint_dir),
        "models": [MODEL],
        "train_missing": False,
    }
    state_dir = Path(tempfile.mkdtemp(prefix="detection-lag-")) / "state"
    server = LiveServer(checkpoint_dir=args.checkpoint_dir, state_dir=state_dir, env=settings)
    with server:
        log = open(state_dir.parent / "worker.log", "wb")  # noqa: SIM115
        worker = subprocess.Popen(
            [sys.executable, "-m", "target_service.cli", "detect", "--state-dir", str(state_dir),
             "--poll", str(args.poll)],
            env=target_env(settings), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while b"watching" not in (state_dir.parent / "worker.log").read_bytes():
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the detection worker did not start: see worker.log")
                time.sleep(0.2)
            keys = [admin_create_client(server, f"a{i}", 100_000) for i in range(args.clients)]
            outcomes: list[dict[str, Any]] = [{} for _ in keys]
            streams = [
                synthetic_steps(args.batches, size=args.request_size, seed=i)
                for i in range(len(keys))
            ]
            threads = [
                threading.Thread(target=attack, args=(server, key, streams[i], outcomes[i]))
                for i, (_, key) in enumerate(keys)
            ]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.perf_counter() - started
            deadline = time.monotonic() + 60  # an attacker the worker never caught
            while time.monotonic() < deadline:
                alarms = httpx2.get(
                    f"{server.url}/v1/admin/alarms", headers=server.admin_headers, timeout=30
                ).json()
                if len(alarms) >= len(keys):
                    break
                time.sleep(0.5)
        finally:
            worker.terminate()
            worker.wait(timeout=60)
    rows = []
    by_client = {a["client_id"]: a for a in alarms if a["status"] == "alarm"}
    for (client_id, _), outcome in zip(keys, outcomes, strict=True):
        alarm = by_client.get(client_id)
        row: dict[str, Any] = {"answered": outcome["answered"], "refused": outcome.get("refused")}
        if alarm is not None:
            charged = next(t for total, t in charge_times(server.state_path, client_id)
                           if total >= alarm["query_index"])  # fmt: skip
            row.update(
                first_alarm_at=alarm["query_index"],
                lag_seconds=round(alarm["created_at"] - charged, 4),
                answered_after_alarm=outcome["answered"] - alarm["query_index"],
            )
        rows.append(row)
    lags = [r["lag_seconds"] for r in rows if "lag_seconds" in r]
    summary = {
        "alarms": len(lags),
        "clients": args.clients,
        "lag_p50": float(np.percentile(lags, 50)) if lags else None,
        "lag_p99": float(np.percentile(lags, 99)) if lags else None,
        "lag_max": max(lags) if lags else None,
        "answered_after_alarm_max": max(
            (r["answered_after_alarm"] for r in rows if "lag_seconds" in r), default=None
        ),
        "attack_seconds": round(seconds, 2),
    }
    report = {
        "benchmark": "detection_lag",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": summary,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    markdown = (
        "| clients | alarms | lag p50 (s) | lag p99 (s) | lag max (s) | most queries answered "
        "after the alarming one |\n|---|---|---|---|---|---|\n"
        f"| {args.clients} | {summary['alarms']} | {summary['lag_p50']:.3f} | "
        f"{summary['lag_p99']:.3f} | {summary['lag_max']:.3f} | "
        f"{summary['answered_after_alarm_max']} |\n"
        if lags
        else "no alarm was raised\n"
    )
    args.output.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
