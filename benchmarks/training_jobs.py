"""Training jobs on the service: wall time per recipe, and predict latency with and without a
job training beside the API process, in the same run.

Starts a real ``target-service serve`` (hosting lenet5-mnist, one training worker), uploads the
embedded MNIST train split (2,500 images) and test split (1,000) through ``mlcore.client``, and
for each recipe (``fastest``, ``standard``; LeNet-5, default detectors, so the MI reference is
measured on the uploaded data) submits a job and follows it, timing queue wait, training and
publishing (checkpoint + MI reference). Meanwhile one closed-loop client sends 1-image predicts
to ``lenet5-mnist``; each latency is filed under "idle" (no job queued or running) or "training"
(a job running), so both percentiles come from the same process, server and background load.

    OMP_NUM_THREADS=1 python benchmarks/training_jobs.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from benchmarks.service_throughput import ensure_checkpoint  # noqa: E402
from mlcore.client import ServiceClient  # noqa: E402
from mlcore.datasets import load_dataset  # noqa: E402
from target_service.testing import LiveServer  # noqa: E402

MODEL = "lenet5-mnist"


class JobWatcher(threading.Thread):
    """Polls one job and stamps when it started running, finished training and succeeded."""

    def __init__(self, service: ServiceClient, job_id: str, poll: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.service, self.job_id, self.poll = service, job_id, poll
        self.submitted = time.perf_counter()
        self.stamps: dict[str, float] = {}
        self.job: dict[str, Any] = {}

    @property
    def running(self) -> bool:
        return "running" in self.stamps and "done" not in self.stamps

    def run(self) -> None:
        while True:
            self.job = self.service.job(self.job_id)
            now = time.perf_counter() - self.submitted
            if self.job["status"] == "running":
                self.stamps.setdefault("running", now)
                if self.job["epoch"] == self.job["epochs"]:
                    self.stamps.setdefault("trained", now)
            if self.job["status"] in ("succeeded", "failed", "cancelled"):
                self.stamps.setdefault("running", now)
                self.stamps.setdefault("trained", now)
                self.stamps["done"] = now
                return
            time.sleep(self.poll)


def predict_loop(
    service: ServiceClient, stop: threading.Event, phase: dict[str, str], latencies: dict
) -> None:
    """One closed-loop client: 1-image predicts, each latency filed under the current phase."""
    x = np.random.default_rng(0).integers(0, 256, (1, 1, 28, 28), dtype=np.uint8)
    while not stop.is_set():
        label = phase["now"]
        started = time.perf_counter()
        service.predict(MODEL, x)
        latencies.setdefault(label, []).append(time.perf_counter() - started)


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {
        "n": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def upload(service: ServiceClient, spec: str, workdir: Path) -> str:
    data = load_dataset(spec)
    path = workdir / f"{spec.replace(':', '-')}.npz"
    np.savez(path, images=data.images.numpy(), labels=data.labels.numpy())
    return service.upload_dataset(path, name=spec.replace(":", "-"))["dataset_id"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["fastest", "standard"])
    parser.add_argument("--arch", default="lenet5")
    parser.add_argument("--idle", type=float, default=10.0, help="idle seconds measured [10]")
    parser.add_argument("--checkpoint-dir", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--output", type=Path, default=Path("results/training_jobs.json"))
    args = parser.parse_args(argv)
    if args.idle <= 0:
        parser.error(f"--idle must be > 0 seconds, got {args.idle}")

    checkpoint_dir = ensure_checkpoint(args.checkpoint_dir)
    workdir = Path(tempfile.mkdtemp(prefix="bench-training-"))
    server = LiveServer(
        checkpoint_dir=checkpoint_dir,
        state_dir=workdir / "state",
        log_path=workdir / "service.log",
        env={"training_workers": 1},
    )
    load_before = os.getloadavg()[0]
    with server:
        created = server.client().post(
            "/v1/admin/clients",
            json={"name": "bench", "budget": 10**9, "training_quota": 10**9},
            headers=server.admin_headers,
        )
        key = created.json()["api_key"]
        owner, caller = ServiceClient(server.url, key), ServiceClient(server.url, key)
        train_id = upload(owner, "mnist-embedded:target-train", workdir)
        test_id = upload(owner, "mnist-embedded:test", workdir)

        stop, phase, latencies = threading.Event(), {"now": "idle"}, {}
        loop = threading.Thread(target=predict_loop, args=(caller, stop, phase, latencies))
        loop.start()
        time.sleep(args.idle / 2)
        jobs = []
        for recipe in args.recipes:
            queued = owner.submit_job(
                dataset_id=train_id,
                test_dataset_id=test_id,
                arch=args.arch,
                recipe=recipe,
                name=f"bench-{recipe}",
            )
            watcher = JobWatcher(owner, queued["job_id"])
            watcher.start()
            while watcher.is_alive():
                phase["now"] = "training" if watcher.running else "other"
                time.sleep(0.05)
            phase["now"] = "idle"
            job = watcher.job
            if job["status"] != "succeeded":
                raise SystemExit(f"job for recipe {recipe} ended {job['status']}: {job['error']}")
            stamps = watcher.stamps
            jobs.append(
                {
                    "recipe": recipe,
                    "arch": args.arch,
                    "epochs": job["epochs"],
                    "train_images": job["metrics"]["train_size"],
                    "wall_s": stamps["done"],
                    "queued_s": stamps["running"],
                    "training_s": stamps["trained"] - stamps["running"],
                    "publishing_s": stamps["done"] - stamps["trained"],
                    "test_accuracy": job["metrics"]["test_accuracy"],
                    "model": job["model"],
                }
            )
            print(json.dumps(jobs[-1]), flush=True)
            time.sleep(args.idle / 2 / len(args.recipes))
        stop.set()
        loop.join()
        owner.close()
        caller.close()

    latency = {label: percentiles(values) for label, values in latencies.items() if values}
    print(json.dumps(latency, indent=2))
    table = markdown(jobs, latency, args)
    print(table)
    result = {
        "command": "python benchmarks/training_jobs.py " + " ".join(sys.argv[1:]),
        "cpus": os.cpu_count(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "python": platform.python_version(),
        "jobs": jobs,
        "predict_latency": latency,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(table)


def markdown(jobs: list[dict], latency: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        f"Training jobs ({args.arch}, embedded MNIST: 2,500 train / 1,000 test images, one "
        f"worker), {os.cpu_count()} CPUs, 1-min load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| recipe | epochs | wall s | queued s | training s | publishing s | test accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for job in jobs:
        lines.append(
            f"| {job['recipe']} | {job['epochs']} | {job['wall_s']:.1f} | {job['queued_s']:.1f} "
            f"| {job['training_s']:.1f} | {job['publishing_s']:.1f} | {job['test_accuracy']:.2%} |"
        )
    lines += [
        "",
        "| predict (1 image, 1 client) | requests | p50 ms | p99 ms |",
        "|---|---|---|---|",
    ]
    for label in ("idle", "training"):
        if label in latency:
            cell = latency[label]
            lines.append(f"| {label} | {cell['n']} | {cell['p50_ms']:.1f} | {cell['p99_ms']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
