"""Probe one protection setting quickly (issue 12's tuning): protect the images with METHOD at
EPS and the given options for each protection seed, train a LeNet-5 (benchmarks/unlearnable.py's
trainer: Adam 1e-3, batch 64) on them with each trainer seed, and print its clean test accuracy
and its final loss on the protected training images (near 0: the trainer fitted the shortcut).

Protection and trainer seeds are separate, so a spread over seeds can be told apart: a weak
noise, or a trainer that happened not to take the shortcut.

    python benchmarks/unlearnable_probe.py em-classwise 32/255 \\
        --options '{"decoupled": true, "min_rounds": 30, "max_rounds": 30}' \\
        --protection-seeds 0 1 --trainer-seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.unlearnable import load_data, parse_eps, train_victim  # noqa: E402
from defenses.unlearnable import METHODS  # noqa: E402
from mlcore.training import accuracy  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Probe one protection setting: protection seeds x trainer seeds (issue 12)."
    )
    parser.add_argument("method", choices=sorted(METHODS))
    parser.add_argument("eps", help="e.g. 32/255")
    parser.add_argument("--options", default="{}", help="the method's options, as JSON")
    parser.add_argument("--protection-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--trainer-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--size", type=int, default=1000, help="balanced subset of the embedded pool"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, source = load_data(None, args.size)
    images, labels = data["images"], data["labels"]
    options = json.loads(args.options)
    print(f"data: {source}; {args.method} {args.eps} {options}")
    scores = []
    for protection_seed in args.protection_seeds:
        started = time.perf_counter()
        result = METHODS[args.method](
            images, labels, eps=parse_eps(args.eps), seed=protection_seed, **options
        )
        seconds = time.perf_counter() - started
        for trainer_seed in args.trainer_seeds:
            model = train_victim(
                "lenet5", result.images, labels, epochs=args.epochs, seed=trainer_seed
            )
            with torch.no_grad():
                loss = F.cross_entropy(model(result.images), labels).item()
            score = accuracy(model, data["test_images"], data["test_labels"])
            scores.append(score)
            print(
                f"protection seed {protection_seed} ({seconds:.0f} s, "
                f"{result.info.get('rounds', '-')} rounds), trainer seed {trainer_seed}: "
                f"clean test {score:.1%}, loss on the protected images {loss:.4f}",
                flush=True,
            )
    spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
    print(f"mean {statistics.fmean(scores):.1%} ± {spread:.1%} over {len(scores)} models")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
