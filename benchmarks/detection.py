"""When do the detectors fire, at the same cost to honest customers? PRADA and the MI-redundancy
detector, each calibrated (``defenses.calibration``) to flag at most 1% and 5% of benign clients
within 1,000 queries, against every extraction strategy the range has (``benchmarks/strategies.py``
finds them in the registries; DRMI also with its queries shuffled), on the embedded default.

Calibration: benign clients drawing from the target's training split, with and without
near-duplicates (``target-service calibrate``'s mechanism; the stricter threshold of the two).
The false-alarm rates are then measured on fresh benign clients drawing from the test split (the
images ``attacker simulate-benign`` sends). Every attacker stream is fed to fresh detectors in
requests of ``--request-size`` images with the target's labels; we report the query index of
the first alarm (or "not within N") and the test accuracy of a LeNet-5 substitute trained on
what the attacker had bought by then.

    python benchmarks/detection.py
    python benchmarks/detection.py --clients 200 --benign-clients 100 --shares 0.01 0.05
    python benchmarks/detection.py --quick          # a smoke run: fewer clients and queries
    python benchmarks/detection.py --sybil-only --strategies jbda "DRMI min-sum a=2"

Sybil rows (issue 14): each attacker stream split round-robin across N = 1, 5, 20 accounts
(``--sybil-accounts``), the accounts taking turns of one request as ``attacker run --api-keys``
sends them (``attacker.sybil.turns``). Per-account detectors see each account's share; the
cross-client detector (``TARGET_DETECTION_GROUPS=org``) sees the union in arrival order. We report
how many accounts were flagged, the first per-account alarm (in total queries sent by then) and
the cross-client first alarm (in union queries), at the same calibrated thresholds.
``--sybil-only`` skips the validation clients and the substitutes.

Writes results/detection.json and results/detection.md (``--sybil-only``: detection_sybil.*).
"""

from __future__ import annotations

import argparse
import hashlib
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
from attacker.oracle import LocalOracle  # noqa: E402
from attacker.sybil import assign_accounts, turns  # noqa: E402
from benchmarks.strategies import discover  # noqa: E402
from defenses.base import make_detector  # noqa: E402
from defenses.calibration import Calibration, calibrate  # noqa: E402
from mlcore.checkpoints import load_checkpoint  # noqa: E402
from mlcore.datasets import ImageDataset, load_dataset  # noqa: E402
from mlcore.training import accuracy  # noqa: E402
from target_service.zoo import (  # noqa: E402
    TARGETS,
    calibrate_target,
    mi_reference,
    train_target,
)

ANCHORS = (
    "Anchors: PRADA reportedly catches JbDA within a few hundred queries with no false alarms "
    "(Juuti et al. 2019); the DRMI paper says PRADA needed about 32,000 queries to detect DRMI "
    "and that an MI detector needs more than 100 malicious queries (Section 7)."
)


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
    target: torch.nn.Module,
    pool: ImageDataset,
    *,
    k: int,
    jbda_k: int,
    seed: int,
    only: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Every strategy's queries (or the strategies named in ``only``) as float32 in [0, 1], in
    the order it sends them (JbDA spends ``jbda_k``, the others ``k``); DRMI also shuffled,
    since its order is by class."""
    streams: dict[str, np.ndarray] = {}
    for strategy in discover():
        if only is not None and strategy.name not in only:
            continue
        budget = jbda_k if strategy.kind == "jbda" else k
        if not strategy.min_k <= budget <= len(pool) and strategy.kind != "jbda":
            print(f"skipping {strategy.name}: cannot buy {budget} of {len(pool)}", flush=True)
            continue
        # only the stream matters here: ART's own substitute trains one epoch
        bought = strategy.buy(LocalOracle(target), pool, k=budget, seed=seed, epochs=1)
        streams[strategy.name] = bought.images.astype(np.float32) / 255.0
        if strategy.method == "drmi":
            order = np.random.default_rng(seed).permutation(len(bought.images))
            streams[f"{strategy.name} (shuffled)"] = streams[strategy.name][order]
        print(f"stream of {strategy.name}: {len(bought.images)} queries", flush=True)
    return streams


def sybil_row(
    detector_name: str,
    settings: dict[str, Any],
    stream: np.ndarray,
    labels: np.ndarray,
    *,
    accounts: int,
    request: int,
) -> dict[str, Any]:
    """One stream split round-robin across ``accounts``: per-account detectors against one
    detector over the union, fed request by request in the accounts' sending order."""
    per_account = [make_detector(detector_name, **settings) for _ in range(accounts)]
    union = make_detector(detector_name, **settings)
    assigned = assign_accounts(np.arange(len(stream)), accounts, "round-robin")
    sent = 0
    first: dict[str, int] | None = None
    for account, chunk in turns(assigned, accounts, turn=request):
        x, y = torch.from_numpy(stream[chunk]), torch.from_numpy(labels[chunk])
        detector = per_account[account]
        seen, was = detector.queries_seen, detector.first_alarm_at
        detector.observe(x, y)
        if first is None and was is None and detector.first_alarm_at is not None:
            first = {
                "account": account + 1,
                "account_queries": detector.first_alarm_at,
                "total_queries": sent + detector.first_alarm_at - seen,
            }
        if union.first_alarm_at is None:
            union.observe(x, y)
        sent += len(chunk)
    return {
        "accounts": accounts,
        "queries": len(stream),
        "accounts_flagged": sum(d.first_alarm_at is not None for d in per_account),
        "first_account_alarm": first,
        "union_first_alarm": union.first_alarm_at,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", nargs="+", type=float, default=[0.01, 0.05])
    parser.add_argument("--horizon", type=int, default=1000, help="benign queries per client")
    parser.add_argument("--clients", type=int, default=200, help="calibration clients")
    parser.add_argument("--benign-clients", type=int, default=100, help="validation clients")
    parser.add_argument(
        "--k", type=int, default=1000, help="queries of the random and DRMI attackers"
    )
    parser.add_argument("--jbda-k", type=int, default=1600)
    parser.add_argument("--request-size", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=20, help="substitute epochs (batch 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", type=Path, default=ROOT / "results" / "checkpoints")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "detection.json")
    parser.add_argument(
        "--quick", action="store_true",
        help="a smoke run: 20 + 10 benign clients of 300 queries (so false-alarm targets of 5% "
        "and 10%), attackers of 300 queries, 5 epochs",
    )  # fmt: skip
    parser.add_argument("--sybil-accounts", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument(
        "--sybil-only",
        action="store_true",
        help="only the Sybil rows: no validation clients, no substitutes",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="reuse this stored calibration of the checkpoint (a copy of an earlier run's "
        "<model>.calibration.json) instead of calibrating",
    )
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=None,
        help="only these strategies (names as in benchmarks/strategies.py)",
    )
    args = parser.parse_args()
    if args.sybil_only and args.output == parser.get_default("output"):
        args.output = ROOT / "results" / "detection_sybil.json"
    if args.quick:
        args.clients, args.benign_clients, args.horizon, args.shares = 20, 10, 300, [0.05, 0.1]
        args.k, args.jbda_k, args.epochs = 300, 300, 5
        if args.output == parser.get_default("output"):
            args.output = ROOT / "results" / "detection_quick.json"
    started = time.perf_counter()
    torch.set_num_threads(1)

    spec = TARGETS["lenet5-mnist"]
    if not (args.checkpoint_dir / f"{spec.name}.pt").exists():
        train_target(spec, args.checkpoint_dir)
    target = load_checkpoint(args.checkpoint_dir / f"{spec.name}.pt").model
    oracle = LocalOracle(target)
    pool, test = load_dataset("mnist-embedded:pool"), load_dataset("mnist-embedded:test")
    detectors = {
        "prada": {},
        "mi_redundancy": {"reference": mi_reference(spec, args.checkpoint_dir)},
    }
    if args.calibration is not None:
        calibration = Calibration.load(args.calibration)
        checkpoint = (args.checkpoint_dir / f"{spec.name}.pt").read_bytes()
        if calibration.source.get("checkpoint_sha256") != hashlib.sha256(checkpoint).hexdigest():
            parser.error(f"--calibration {args.calibration} was made for another checkpoint")
        args.clients, args.horizon = calibration.clients, calibration.horizon
    else:
        calibration = calibrate_target(
            spec, args.checkpoint_dir, detectors, clients=args.clients, horizon=args.horizon,
            share=min(args.shares), seed=args.seed,
        )  # fmt: skip
    print(f"calibrated in {calibration.source['seconds']} s", flush=True)
    attackers = attacker_streams(
        target, pool, k=args.k, jbda_k=args.jbda_k, seed=args.seed, only=args.strategies
    )
    labels = {name: oracle.predict_labels(stream) for name, stream in attackers.items()}
    sybil: list[dict[str, Any]] = []
    for share in args.shares:
        for detector_name, base in detectors.items():
            setting = calibration.detectors[detector_name]["setting"]
            threshold = calibration.threshold(detector_name, share)
            for name, stream in attackers.items():
                for accounts in args.sybil_accounts:
                    sybil.append({
                        "share": share, "detector": detector_name, "setting": setting,
                        "threshold": threshold, "strategy": name,
                        **sybil_row(detector_name, {**base, setting: threshold}, stream,
                                    labels[name], accounts=accounts, request=args.request_size),
                    })  # fmt: skip
    print("Sybil rows: done", flush=True)
    if args.sybil_only:
        return write_sybil_report(args, sybil, calibration, started)
    validation = calibrate(
        detectors, test.images, lambda x: torch.from_numpy(oracle.predict_labels(x.numpy())),
        clients=args.benign_clients, horizon=args.horizon, share=max(args.shares),
        seed=args.seed + 1,
    )  # fmt: skip
    print("validated on fresh benign clients", flush=True)

    rows: list[dict[str, Any]] = []
    substitute_cache: dict[tuple[str, int], float] = {}
    for share in args.shares:
        for detector_name, base in detectors.items():
            setting = calibration.detectors[detector_name]["setting"]
            threshold = calibration.threshold(detector_name, share)
            benign = {
                population: float(np.mean([e is not None and e < threshold for e in extremes]))
                for population, extremes in validation.detectors[detector_name]["extremes"].items()
            }
            row: dict[str, Any] = {
                "share": share, "detector": detector_name, "setting": setting,
                "threshold": threshold, "benign_false_alarm_rate": benign, "attacks": {},
            }  # fmt: skip
            for name, stream in attackers.items():
                alarm, _ = first_alarm(
                    detector_name, {**base, setting: threshold}, stream, labels[name],
                    args.request_size,
                )  # fmt: skip
                bought = alarm if alarm is not None else len(stream)
                if (name, bought) not in substitute_cache:
                    data = ImageDataset(
                        "stream",
                        torch.from_numpy(stream[:bought]),
                        torch.from_numpy(labels[name][:bought]),
                        10,
                    )
                    model, _, _ = train_substitute(
                        data, np.arange(bought), labels[name][:bought], epochs=args.epochs,
                        seed=args.seed,
                    )  # fmt: skip
                    substitute_cache[(name, bought)] = accuracy(model, test.images, test.labels)
                row["attacks"][name] = {
                    "queries": len(stream), "first_alarm_at": alarm,
                    "substitute_accuracy": substitute_cache[(name, bought)],
                }  # fmt: skip
            rows.append(row)
            print(f"{detector_name} at {share:g}: done", flush=True)

    report = {
        "benchmark": "detection",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "rows": rows,
        "sybil": sybil,
        "settings": vars(args)
        | {"checkpoint_dir": str(args.checkpoint_dir), "output": str(args.output)},
        "calibration": {
            k: v for k, v in calibration.to_dict().items() if k not in ("detectors", "thresholds")
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(rows, list(attackers), args.benign_clients) + sybil_markdown(sybil)
    args.output.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {args.output} in {report['seconds']} s")
    return 0


def write_sybil_report(
    args: argparse.Namespace, sybil: list[dict[str, Any]], calibration: Any, started: float
) -> int:
    report = {
        "benchmark": "detection_sybil",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "sybil": sybil,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "calibration": {
            k: v for k, v in calibration.to_dict().items() if k not in ("detectors", "thresholds")
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    markdown = sybil_markdown(sybil)
    args.output.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {args.output} in {report['seconds']} s")
    return 0


def sybil_markdown(sybil: list[dict[str, Any]]) -> str:
    """One row per strategy, accounts, detector and false-alarm target."""
    names = {"prada": "PRADA", "mi_redundancy": "MI redundancy"}
    lines = [
        "",
        "| strategy | queries | accounts | detector (benign flagged) | threshold | accounts "
        "flagged | first per-account alarm: account query (total queries sent) | cross-client "
        "(union) first alarm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sybil:
        first = row["first_account_alarm"]
        per_account = (
            "none" if first is None else f"{first['account_queries']} ({first['total_queries']})"
        )
        union = row["union_first_alarm"]
        lines.append(
            f"| {row['strategy']} | {row['queries']} | {row['accounts']} | "
            f"{names.get(row['detector'], row['detector'])} ({row['share']:.0%}) | "
            f"{row['setting']} = {row['threshold']:.4f} | {row['accounts_flagged']} of "
            f"{row['accounts']} | {per_account} | "
            f"{union if union is not None else 'not within ' + str(row['queries'])} |"
        )
    return "\n".join(lines) + "\n"


def to_markdown(rows: list[dict[str, Any]], attackers: list[str], benign_clients: int) -> str:
    """One row per strategy; per detector and false-alarm target, its first alarm (and the test
    accuracy of a substitute trained on what was bought until then)."""
    names = {"prada": "PRADA", "mi_redundancy": "MI redundancy"}
    thresholds = [
        "| benign clients flagged (target) | detector | threshold | measured on fresh benign "
        f"clients ({benign_clients} each) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        measured = ", ".join(f"{p} {r:.0%}" for p, r in row["benign_false_alarm_rate"].items())
        thresholds.append(
            f"| {row['share']:.0%} | {names.get(row['detector'], row['detector'])} | "
            f"{row['setting']} = {row['threshold']:.4f} | {measured} |"
        )
    header = [
        f"{names.get(row['detector'], row['detector'])} at {row['share']:.0%}: first alarm "
        "(substitute accuracy)"
        for row in rows
    ]
    lines = [
        "| strategy | queries | " + " | ".join(header) + " |",
        "|---" * (2 + len(rows)) + "|",
    ]
    for attack in attackers:
        cells = [attack, str(rows[0]["attacks"][attack]["queries"])]
        for row in rows:
            a = row["attacks"][attack]
            alarm = a["first_alarm_at"]
            when = str(alarm) if alarm is not None else f"not within {a['queries']}"
            cells.append(f"{when} ({a['substitute_accuracy']:.2%})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*thresholds, "", *lines]) + "\n\n" + ANCHORS + "\n"


if __name__ == "__main__":
    sys.exit(main())
