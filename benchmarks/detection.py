"""When do the detectors fire? PRADA (delta sweep) and the MI-redundancy detector against benign
clients, a random-pool attacker, a DRMI attacker and a JbDA attacker, on the embedded default.

Every stream is what the client would send the service, fed to fresh detectors in requests of
``--request-size`` images with the target's labels; we report the query index of the first
alarm (or "not within N"), the false-alarm rate over the benign clients, and the test accuracy
of a LeNet-5 substitute trained on what each attacker had bought by its first alarm.

    python benchmarks/detection.py
    python benchmarks/detection.py --benign-clients 40 --deltas 0.9 0.95 0.99

Writes results/detection.json and results/detection.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attacker.extraction import train_substitute  # noqa: E402
from attacker.jbda import jbda_extract  # noqa: E402
from attacker.oracle import LocalOracle  # noqa: E402
from attacker.selection import make_selector  # noqa: E402
from defenses.base import make_detector  # noqa: E402
from mlcore.checkpoints import load_checkpoint  # noqa: E402
from mlcore.datasets import ImageDataset, load_dataset  # noqa: E402
from mlcore.streams import benign_stream  # noqa: E402
from mlcore.training import accuracy  # noqa: E402
from target_service.zoo import TARGETS, mi_reference, train_target  # noqa: E402

ANCHORS = (
    "Anchors: PRADA reportedly catches JbDA within a few hundred queries with no false alarms "
    "(Juuti et al. 2019); the DRMI paper says PRADA needed about 32,000 queries to detect DRMI "
    "and that an MI detector needs more than 100 malicious queries (Section 7)."
)


class RecordingOracle(LocalOracle):
    """A LocalOracle that keeps every query it answered, in order: the attacker's stream."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.images: list[np.ndarray] = []

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        self.images.append(
            np.asarray(images, dtype=np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
        )
        return super().predict_labels(images)


def first_alarm(
    detector_name: str,
    settings: dict[str, Any],
    stream: np.ndarray,
    labels: np.ndarray,
    request: int,
):
    detector = make_detector(detector_name, **settings)
    x, y = torch.from_numpy(stream), torch.from_numpy(labels)
    for start in range(0, len(stream), request):
        detector.observe(x[start : start + request], y[start : start + request])
        if detector.first_alarm_at is not None:
            break
    return detector.first_alarm_at, detector.verdict.statistic


def attacker_streams(
    target: torch.nn.Module, pool: ImageDataset, *, k: int, jbda_k: int, seed: int
) -> dict[str, np.ndarray]:
    """Float32 streams in [0, 1], in the order each attacker sends them."""
    images = pool.images.numpy()
    order = np.random.default_rng(seed).permutation(len(pool))[:k]
    drmi = make_selector("drmi", alpha=2.0, init="min-sum")(
        images, pool.labels.numpy(), k=k
    ).indices
    recorder = RecordingOracle(target)
    jbda_extract(recorder, pool, k=jbda_k, seed_size=100, seed=seed)
    return {
        "random pool attacker": images[order].astype(np.float32) / 255.0,
        "DRMI attacker (class order)": images[drmi].astype(np.float32) / 255.0,
        "DRMI attacker (shuffled)": images[np.random.default_rng(seed).permutation(drmi)].astype(
            np.float32
        )
        / 255.0,
        "JbDA attacker": np.concatenate(recorder.images),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--deltas", nargs="+", type=float, default=[0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.98, 0.99]
    )
    parser.add_argument("--benign-clients", type=int, default=20)
    parser.add_argument("--benign-queries", type=int, default=1000)
    parser.add_argument(
        "--repeat-rates", nargs="+", type=float, default=[0.0, 0.1], help="benign repeat rates"
    )
    parser.add_argument(
        "--k", type=int, default=1000, help="queries of the random and DRMI attackers"
    )
    parser.add_argument("--jbda-k", type=int, default=1600)
    parser.add_argument("--request-size", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=20, help="substitute epochs (batch 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", type=Path, default=ROOT / "results" / "checkpoints")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "detection.json")
    args = parser.parse_args()
    started = time.perf_counter()

    spec = TARGETS["lenet5-mnist"]
    if not (args.checkpoint_dir / f"{spec.name}.pt").exists():
        train_target(spec, args.checkpoint_dir)
    target = load_checkpoint(args.checkpoint_dir / f"{spec.name}.pt").model
    oracle = LocalOracle(target)
    pool, test = load_dataset("mnist-embedded:pool"), load_dataset("mnist-embedded:test")
    reference = mi_reference(spec, args.checkpoint_dir)
    configs = [("prada", {"delta": d}, f"PRADA delta={d:g}") for d in args.deltas] + [
        (
            "mi_redundancy",
            {"reference": reference},
            f"MI redundancy (FAR {reference.settings['false_alarm_rate']:g})",
        )
    ]

    benign = {
        rate: [
            benign_stream(
                test.images, args.benign_queries, repeat_rate=rate, noise=0.02, seed=i
            ).images.numpy()
            for i in range(args.benign_clients)
        ]
        for rate in args.repeat_rates
    }
    attackers = attacker_streams(target, pool, k=args.k, jbda_k=args.jbda_k, seed=args.seed)
    labels = {name: oracle.predict_labels(stream) for name, stream in attackers.items()}
    benign_labels = {
        rate: [oracle.predict_labels(s) for s in streams] for rate, streams in benign.items()
    }

    rows: list[dict[str, Any]] = []
    substitute_cache: dict[tuple[str, int], float] = {}
    for detector_name, settings, label in configs:
        for rate, streams in benign.items():
            alarms = [
                first_alarm(detector_name, settings, stream, y, args.request_size)[0]
                for stream, y in zip(streams, benign_labels[rate], strict=True)
            ]
            flagged = [a for a in alarms if a is not None]
            rows.append(
                {
                    "detector": label, "client": f"benign x{len(streams)} (repeat rate {rate:g})",
                    "queries": args.benign_queries, "first_alarm_at": min(flagged) if flagged else None,
                    "false_alarm_rate": len(flagged) / len(streams), "substitute_accuracy": None,
                }
            )  # fmt: skip
        for name, stream in attackers.items():
            alarm, statistic = first_alarm(
                detector_name, settings, stream, labels[name], args.request_size
            )
            bought = alarm if alarm is not None else len(stream)
            if (name, bought) not in substitute_cache:
                data = ImageDataset(
                    "stream",
                    torch.from_numpy(stream[:bought]),
                    torch.from_numpy(labels[name][:bought]),
                    10,
                )
                model, _, _ = train_substitute(
                    data,
                    np.arange(bought),
                    labels[name][:bought],
                    epochs=args.epochs,
                    seed=args.seed,
                )
                substitute_cache[(name, bought)] = accuracy(model, test.images, test.labels)
            rows.append(
                {
                    "detector": label, "client": name, "queries": len(stream), "first_alarm_at": alarm,
                    "false_alarm_rate": None, "substitute_accuracy": substitute_cache[(name, bought)],
                    "statistic": statistic,
                }
            )  # fmt: skip
        print(f"{label}: done", flush=True)

    report = {
        "benchmark": "detection",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "rows": rows,
        "settings": vars(args)
        | {"checkpoint_dir": str(args.checkpoint_dir), "output": str(args.output)},
        "mi_reference": {"threshold": reference.threshold, **reference.settings},
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(rows)
    args.output.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {args.output} in {report['seconds']} s")
    return 0


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| detector | client | queries | first alarm at (benign: earliest) | false-alarm rate | substitute accuracy by then |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        alarm = row["first_alarm_at"]
        far, acc = row["false_alarm_rate"], row["substitute_accuracy"]
        cells = [
            row["detector"],
            row["client"],
            str(row["queries"]),
            str(alarm) if alarm is not None else f"not within {row['queries']}",
            "" if far is None else f"{far:.0%}",
            "" if acc is None else f"{acc:.2%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + ANCHORS + "\n"


if __name__ == "__main__":
    sys.exit(main())
