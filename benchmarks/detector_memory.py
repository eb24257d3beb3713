"""Server memory for one client that sends many noise images, and its detector snapshot size.

Starts a real ``target-service serve`` (lenet5-mnist, the default detectors: PRADA and MI
redundancy) in a subprocess, warms it up with ``--warm-up`` images of another client (imports,
thread pool and allocator arenas reach their working size), then one client
sends ``--images`` uniform-noise uint8 images (28x28) in batches of ``--batch``. Reported: the
server's resident memory (VmRSS from /proc) after the warm-up and after the stream, its peak
(VmHWM), sampled every ``--sample-every`` images, what PRADA says it stores (admin view), and the size of the client's snapshot file
after a graceful stop (the service snapshots every stream at shutdown). Noise is the worst case
for PRADA: almost every noise image is far from all earlier ones, so it joins the growing set
until ``max_stored``, and random bytes do not compress.

    python benchmarks/detector_memory.py                 # 30,000 images
    python benchmarks/detector_memory.py --images 3000   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from benchmarks.service_throughput import MODEL, ensure_checkpoint  # noqa: E402
from mlcore.wire import encode_tensor  # noqa: E402
from target_service.testing import LiveServer, admin_create_client  # noqa: E402

MB = 2**20


def memory_mb(pid: int) -> dict[str, float]:
    """Resident (VmRSS) and peak resident (VmHWM) memory of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB
    return {"rss_mb": fields["VmRSS"], "peak_rss_mb": fields["VmHWM"]}


def send(
    server: LiveServer, key: str, images: np.ndarray, batch: int, *, sample_every: int = 0
) -> list[dict[str, float]]:
    """Send ``images`` in batches; every ``sample_every`` images, sample the server's memory."""
    assert server.process is not None
    samples = []
    with server.client(headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
        for start in range(0, len(images), batch):
            x = images[start : start + batch]
            response = http.post(
                f"/v1/models/{MODEL}/predict", json={"inputs": encode_tensor(x).model_dump()}
            )
            if response.status_code != 200:
                raise SystemExit(f"request at image {start} failed: {response.text}")
            sent = start + len(x)
            if sample_every and (sent % sample_every == 0 or sent == len(images)):
                samples.append({"images": sent, **memory_mb(server.process.pid)})
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--warm-up", type=int, default=3000, help="noise images another client sends first"
    )
    parser.add_argument("--sample-every", type=int, default=5000, help="images between samples")
    parser.add_argument(
        "--detectors",
        type=json.loads,
        default=None,
        help="TARGET_DETECTORS as JSON, e.g. '{\"lenet5-mnist\": {}}' (default: the service's)",
    )
    parser.add_argument("--checkpoint-dir", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "detector_memory.json")
    args = parser.parse_args(argv)
    if min(args.images, args.warm_up, args.sample_every) < 1 or not 1 <= args.batch <= 1000:
        parser.error(
            "--images, --warm-up and --sample-every must be >= 1 and --batch in 1..1000, got "
            f"{args.images}, {args.warm_up}, {args.sample_every}, {args.batch}"
        )

    noise = np.random.default_rng(args.seed).integers(0, 256, (args.images, 1, 28, 28), np.uint8)
    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    server = LiveServer(
        checkpoint_dir=ensure_checkpoint(args.checkpoint_dir),
        state_dir=workdir / "state",
        log_path=workdir / "service.log",
        env={"max_batch": args.batch}
        if args.detectors is None
        else {"max_batch": args.batch, "detectors": args.detectors},
    )
    with server:
        _, warm_key = admin_create_client(server, "warm-up", args.warm_up)
        warm = send(server, warm_key, noise[: args.warm_up], args.batch, sample_every=args.warm_up)
        client_id, key = admin_create_client(server, "noise", args.images)
        began = time.perf_counter()
        samples = send(server, key, noise, args.batch, sample_every=args.sample_every)
        seconds = time.perf_counter() - began
        view = httpx2.get(
            f"{server.url}/v1/admin/clients/{client_id}", headers=server.admin_headers, timeout=60
        ).json()
    snapshot = server.state_dir / "detectors" / client_id / f"{MODEL}.npz"
    prada = view["detectors"].get("prada", {"stored": 0, "max_stored": None})
    result = {
        "images": args.images,
        "batch": args.batch,
        "warm_up_images": args.warm_up,
        "warm_rss_mb": warm[-1]["rss_mb"],
        "rss_mb": samples[-1]["rss_mb"],
        "rss_growth_mb": samples[-1]["rss_mb"] - warm[-1]["rss_mb"],
        "peak_rss_mb": samples[-1]["peak_rss_mb"],
        "samples": samples,
        "prada_stored": prada["stored"],
        "prada_max_stored": prada["max_stored"],
        "prada_stored_mb": prada["stored"] * 784 / MB,
        "snapshot_mb": snapshot.stat().st_size / MB if snapshot.exists() else None,
        "seconds": seconds,
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "python": platform.python_version(),
        "command": "python benchmarks/detector_memory.py " + " ".join(argv or sys.argv[1:]),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
