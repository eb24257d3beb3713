"""Per-query cost of the stealing detectors: PRADA against its stored-query count, MI redundancy.

PRADA: one client whose single class already holds N stored queries (N = 1k, 10k, 20k by
default, 20k being the default ``max_stored``; the growing set G_c (uint8) and N past distances
are put in place through ``load_state_dict``, built from embedded MNIST images with a little
noise so all rows differ, and the detector's ``max_stored`` is N, so the set stays at N), then
``--queries`` test images of that class are observed one at a time and, in a fresh copy, as
batches of 100. Times include everything a query pays: the min-distance search, the threshold
update, and the Shapiro-Wilk test on the N+ pooled distances every 10th query. Two baselines in
the same process: reading the stored set once from memory (``np.max`` over the uint8 set: one
vectorised pass over its bytes, the least any exact search must do per query; median of 20),
compared in CPU time (this thread's, so waiting for a core on a busy machine does not count), and
the authors' per-stored-query loop (``np.sqrt(np.sum((a - b) ** 2))`` over G_c in a list
comprehension, their ``growing_set.py``) timed on a few queries of the same G_c.

MI redundancy: a client with a full window (100 by default) observes ``--queries`` test images
one at a time and in batches of 100; plus the calibration cost per benign window.

    python benchmarks/detector_cost.py    # 1k, 10k, 20k stored; threads 1 and torch's default
    python benchmarks/detector_cost.py --sizes 1000 --queries 102 --threads 1    # quick

Every configuration runs once per ``--threads`` value: on a busy shared machine, torch's
multi-threaded kernels can stall waiting for a core, and one thread is often faster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from scipy.stats import shapiro  # noqa: E402  (imported before any timing)

from defenses.mi_redundancy import MiRedundancyDetector, calibrate_mi_reference  # noqa: E402
from defenses.prada import PradaDetector  # noqa: E402
from mlcore.datasets import load_dataset  # noqa: E402

BATCH = 100


def prada_state(n: int, seed: int) -> dict:
    """A PRADA state whose class 0 holds n stored queries and n past distances."""
    rng = torch.Generator().manual_seed(seed)
    train = load_dataset("mnist-embedded:target-train").as_float().reshape(-1, 784)
    rows = train[torch.randint(0, len(train), (n,), generator=rng)]
    rows = (rows + 0.05 * torch.randn(rows.shape, generator=rng)).clamp_(0, 1)
    rows = rows.mul_(255).round_().to(torch.uint8)
    dists = torch.from_numpy(np.random.default_rng(seed).normal(7.0, 1.0, n))
    return {
        "kind": "prada",
        "queries_seen": 10 * ((n + 9) // 10),
        "first_alarm_at": None,
        "input_shape": [1, 28, 28],
        "flagged": False,
        "statistic": None,
        "classes": [0],
        "growing_sets": [rows],
        "growing_dists": [dists.clone()],
        "thresholds": [0.0],  # every distinct query joins G_c: the set keeps growing
        "dists": [dists],
        "dist_order": [0],
    }


def authors_loop_seconds(rows: np.ndarray, queries: np.ndarray) -> float:
    """Mean seconds per query of the authors' min-distance search (a Python loop over G_c)."""

    def l2(a: np.ndarray, b: np.ndarray) -> float:
        return np.sqrt(np.sum((a - b) ** 2))

    began = time.perf_counter()
    for q in queries:
        np.min(np.asarray([l2(g, q) for g in rows]))
    return (time.perf_counter() - began) / len(queries)


def read_once_seconds(rows: np.ndarray, repeats: int = 20) -> float:
    """Median CPU seconds of one vectorised pass over the stored bytes (``np.max``)."""
    seconds = []
    for _ in range(repeats):
        began = time.thread_time()
        rows.max()
        seconds.append(time.thread_time() - began)
    return float(np.median(seconds))


def time_observe(detector, x: torch.Tensor, batch: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU (this thread's) seconds per observe call, one call per ``batch``
    queries. On a shared machine wall time includes waiting for a core; CPU time does not."""
    labels = torch.zeros(len(x), dtype=torch.int64)
    wall, cpu = [], []
    for i in range(0, len(x), batch):
        began, began_cpu = time.perf_counter(), time.thread_time()
        detector.observe(x[i : i + batch], labels[i : i + batch])
        wall.append(time.perf_counter() - began)
        cpu.append(time.thread_time() - began_cpu)
    return wall, cpu


def summary(seconds: tuple[list[float], list[float]], batch: int) -> dict[str, float]:
    per_query = np.asarray(seconds[0]) / batch
    return {
        "mean_ms": float(per_query.mean() * 1e3),
        "median_ms": float(np.median(per_query) * 1e3),
        "p95_ms": float(np.quantile(per_query, 0.95) * 1e3),
        "cpu_mean_ms": float(np.sum(seconds[1]) / (batch * len(seconds[1])) * 1e3),
    }


def bench_prada(sizes: list[int], n_queries: int, baseline_queries: int) -> list[dict]:
    test = load_dataset("mnist-embedded:test").as_float()
    x = test[:n_queries]
    rows_out = []
    for n in sizes:
        state = prada_state(n, seed=n)
        row: dict = {"stored": n, "state_mb": n * 784 / 2**20}
        for mode, batch in (("one_by_one", 1), ("batch_100", BATCH)):
            detector = PradaDetector(max_stored=n)
            detector.load_state_dict(state)
            time_observe(detector, x[:2], 1)  # warm-up (first allocation, scipy import)
            row[mode] = summary(time_observe(detector, x[2:], batch), batch)
            row[f"{mode}_stored_after"] = detector.growing_set_sizes[0]
        began = time.perf_counter()
        with warnings.catch_warnings():  # N > 5000: the p-value is approximate, W is not
            warnings.simplefilter("ignore", UserWarning)
            shapiro(state["dists"][0].numpy())
        row["shapiro_ms"] = (time.perf_counter() - began) * 1e3
        g = state["growing_sets"][0].numpy()
        row["read_once_ms"] = read_once_seconds(g) * 1e3  # CPU time
        for mode in ("one_by_one", "batch_100"):
            row[f"{mode}_vs_read_once"] = row[mode]["cpu_mean_ms"] / row["read_once_ms"]
        q = x[:baseline_queries].reshape(-1, 784).numpy()
        row["authors_loop_ms"] = authors_loop_seconds(g.astype(np.float32) / 255, q) * 1e3
        row["speedup_vs_authors_loop"] = row["authors_loop_ms"] / row["one_by_one"]["mean_ms"]
        rows_out.append(row)
        del state, g
    return rows_out


def bench_mi(windows: list[int], n_queries: int, n_calibration: int) -> list[dict]:
    train = load_dataset("mnist-embedded:target-train").images
    test = load_dataset("mnist-embedded:test").images
    rows_out = []
    for window in windows:
        calibrate_mi_reference(train, window=window, n_windows=2, false_alarm_rate=0.5)  # JIT
        began = time.perf_counter()
        reference = calibrate_mi_reference(
            train, window=window, n_windows=n_calibration, false_alarm_rate=0.05
        )
        calibration_ms = (time.perf_counter() - began) * 1e3 / n_calibration
        row: dict = {"window": window, "calibration_ms_per_window": calibration_ms}
        for mode, batch in (("one_by_one", 1), ("batch_100", BATCH)):
            detector = MiRedundancyDetector(reference=reference)
            detector.observe(train[:window], torch.zeros(window, dtype=torch.int64))  # fill it
            row[mode] = summary(time_observe(detector, test[:n_queries], batch), batch)
        rows_out.append(row)
    return rows_out


def markdown(prada: list[dict], mi: list[dict]) -> str:
    lines = [
        "| detector | state | per query, 1 by 1: wall mean / p95, CPU mean (ms) "
        "| per query, batches of 100: wall, CPU mean (ms) | read the set once, CPU (ms) "
        "| 1 by 1 / read once (CPU) | batched / read once (CPU) | authors' loop (ms/query) "
        "| speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in prada:
        one, batched = r["one_by_one"], r["batch_100"]
        lines.append(
            f"| PRADA | {r['stored']:,} stored queries ({r['state_mb']:.1f} MB) "
            f"| {one['mean_ms']:.3f} / {one['p95_ms']:.3f}, {one['cpu_mean_ms']:.3f} "
            f"| {batched['mean_ms']:.3f}, {batched['cpu_mean_ms']:.3f} "
            f"| {r['read_once_ms']:.3f} "
            f"| {r['one_by_one_vs_read_once']:.1f}x | {r['batch_100_vs_read_once']:.1f}x "
            f"| {r['authors_loop_ms']:.1f} | {r['speedup_vs_authors_loop']:.0f}x |"
        )
    for r in mi:
        lines.append(
            f"| MI redundancy | window {r['window']} "
            f"| {r['one_by_one']['mean_ms']:.3f} / {r['one_by_one']['p95_ms']:.3f}, "
            f"{r['one_by_one']['cpu_mean_ms']:.3f} "
            f"| {r['batch_100']['mean_ms']:.3f}, {r['batch_100']['cpu_mean_ms']:.3f} "
            "| - | - | - | - | - |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 20_000])
    parser.add_argument("--queries", type=int, default=200, help="timed queries per setting")
    parser.add_argument("--baseline-queries", type=int, default=5)
    parser.add_argument("--windows", type=int, nargs="+", default=[100])
    parser.add_argument("--calibration-windows", type=int, default=40)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=sorted({1, torch.get_num_threads()}),
        help="torch thread counts to run with, one full run each (default: 1 and torch's)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "detector_cost.json")
    args = parser.parse_args(argv)
    if args.queries < 2 + BATCH:
        raise SystemExit(f"--queries must be at least {2 + BATCH}, got {args.queries}")
    if any(t < 1 for t in args.threads):
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")

    runs = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        prada = bench_prada(args.sizes, args.queries, args.baseline_queries)
        mi = bench_mi(args.windows, args.queries, args.calibration_windows)
        runs.append({"torch_threads": threads, "prada": prada, "mi_redundancy": mi})
        print(f"torch threads: {threads}")
        print(markdown(prada, mi))
    result = {
        "runs": runs,
        "queries": args.queries,
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": "python benchmarks/detector_cost.py " + " ".join(argv or sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
