"""Dataset condensation defaults (issue 11, item 1): test accuracy of models trained on the
condensed set against the number of iterations, on the embedded MNIST, in one run per method
and initialisation (the images are evaluated as the run passes each iteration count).

Each condensation condenses ``mnist-embedded:target-train`` into 10 images per class through the
authors' ConvNet (width 128, depth 3) with the method's defaults (``defenses/condensation``);
at each checkpoint a fresh LeNet-5 is trained on the images (Adam, full batch, 200 epochs) and
tested on ``mnist-embedded:test``; at the last, a fresh ConvNet too. A random real subset of
10 images per class, trained the same way, is the baseline. Seconds (wall clock, and CPU of
this process) are those of the condensation alone, evaluation excluded.

    OMP_NUM_THREADS=1 python benchmarks/condensation_defaults.py --run dm:real dm:noise dc:real

Writes results/condensation_defaults.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from defenses.condensation import CondensationConfig, condense  # noqa: E402
from defenses.condensation.evaluation import (  # noqa: E402
    evaluate_training_set,
    random_real_baseline,
)
from mlcore.datasets import load_dataset  # noqa: E402

LENET_EPOCHS = 200
CONVNET_EPOCHS = 100


def run_one(method: str, init: str, checkpoints: list[int], iterations: int | None) -> dict:
    train = load_dataset("mnist-embedded:target-train")
    test = load_dataset("mnist-embedded:test")
    config = CondensationConfig(method=method, ipc=10, init=init, iterations=iterations)  # type: ignore[arg-type]
    resolved = config.resolved()
    assert resolved.iterations is not None
    wanted = {c for c in checkpoints if c <= resolved.iterations} | {0, resolved.iterations}
    rows: list[dict[str, Any]] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    paused = cpu_paused = 0.0

    def observe(done: int, images: torch.Tensor) -> None:
        nonlocal paused, cpu_paused
        if done not in wanted:
            return
        pause, cpu_pause = time.perf_counter(), time.process_time()
        labels = torch.arange(10).repeat_interleave(10)
        archs = ("lenet5", "convnet") if done == resolved.iterations else ("lenet5",)
        row: dict[str, Any] = {
            "iterations": done,
            "seconds": round(pause - started - paused),
            "cpu_seconds": round(cpu_pause - cpu_started - cpu_paused),
        }
        for arch in archs:
            epochs = LENET_EPOCHS if arch == "lenet5" else CONVNET_EPOCHS
            result = evaluate_training_set(
                images.clone(), labels, test, training_set=method, archs=(arch,), epochs=epochs
            )[0]
            row[arch] = round(result.mean, 4)
        rows.append(row)
        print(method, init, row, flush=True)
        paused += time.perf_counter() - pause
        cpu_paused += time.process_time() - cpu_pause

    condense(train, config, observe=observe)
    return {"method": method, "init": init, "settings": resolved.to_json(), "rows": rows}


def baseline() -> dict:
    train = load_dataset("mnist-embedded:target-train")
    test = load_dataset("mnist-embedded:test")
    out = {}
    for arch, epochs in (("lenet5", LENET_EPOCHS), ("convnet", CONVNET_EPOCHS)):
        result = random_real_baseline(
            train, 10, test, archs=(arch,), seeds=(0, 1, 2), epochs=epochs
        )[0]
        out[arch] = {
            "mean": round(result.mean, 4),
            "accuracies": [round(a, 4) for a in result.accuracies],
        }
    print("random", out, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", nargs="+", default=["dm:real", "dm:noise", "dc:real"])
    parser.add_argument("--checkpoints", nargs="+", type=int, default=[1, 2, 10, 25, 50])
    parser.add_argument("--iterations", type=int, default=None, help="default: the method's")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "condensation_defaults")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = [run_one(*spec.split(":"), args.checkpoints, args.iterations) for spec in args.run]
    result = {"runs": runs, "random_real": None if args.no_baseline else baseline()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        "| method | init | iterations | condensation s (CPU s) | LeNet-5 | ConvNet |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        for row in run["rows"]:
            convnet = f"{100 * row['convnet']:.1f}%" if "convnet" in row else ""
            lines.append(
                f"| {run['method']} | {run['init']} | {row['iterations']} | {row['seconds']} "
                f"({row['cpu_seconds']}) | "
                f"{100 * row['lenet5']:.1f}% | {convnet} |"
            )
    if result["random_real"]:
        rr = result["random_real"]
        lines.append(
            f"| random real (3 subsets) | - | - | - | {100 * rr['lenet5']['mean']:.1f}% | "
            f"{100 * rr['convnet']['mean']:.1f}% |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
