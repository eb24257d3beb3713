"""DRMI paper Table 3 / Figure 3 (and the Table 6 cross-distribution setting) on this machine.

For each pool and budget k, every strategy (random, and DRMI for each alpha and init) picks k
pool images; a LocalOracle of the target labels them; a LeNet-5 substitute is trained on those
labels (Adam 1e-3, batch 4) once per seed; we report test accuracy and agreement with the
target, mean and std over seeds. Same target, same pool, same seeds for every strategy.

    python benchmarks/extraction_vs_queries.py                      # embedded MNIST + digits pools
    python benchmarks/extraction_vs_queries.py --pools mnist --data-root ../shared/data

Writes results/extraction_vs_queries.json and .md; the paper's figures are printed beside ours.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attacker.extraction import train_substitute  # noqa: E402
from attacker.oracle import LocalOracle  # noqa: E402
from attacker.selection import make_selector  # noqa: E402
from mlcore.checkpoints import load_checkpoint  # noqa: E402
from mlcore.datasets import load_dataset  # noqa: E402
from mlcore.training import predict_labels  # noqa: E402
from target_service.zoo import TARGETS, TargetSpec, train_target  # noqa: E402

# DRMI paper, full MNIST, LeNet-5 (Table 3 and Section 5.2; 50 queries from the text).
PAPER = {
    "DRMI min-sum a=2": {50: 0.82, 150: 0.9213, 300: 0.9429, 600: 0.9584},
    "DRMI min-sum a=1": {150: 0.8801, 300: 0.9374, 600: 0.9559},
    "DRMI min-sum a=4": {150: 0.9135, 300: 0.9409, 600: 0.9638},
    "DRMI min-max a=1": {150: 0.8707, 300: 0.9199, 600: 0.9552},
    "DRMI min-max a=2": {150: 0.9015, 300: 0.9349, 600: 0.9601},
    "DRMI min-max a=4": {150: 0.9199, 300: 0.9414, 600: 0.9641},
    "random": {150: 0.8497, 300: 0.8848, 600: 0.9191},
}

# pool spec -> (target spec, test spec): the target is always trained on target-train data.
SETTINGS = {
    "embedded": ("mnist-embedded:pool", TARGETS["lenet5-mnist"], "mnist-embedded:test"),
    "digits": ("digits-embedded:pool", TARGETS["lenet5-mnist"], "mnist-embedded:test"),
    "mnist": (
        "mnist:pool",
        TargetSpec("lenet5-mnist-full", "lenet5", "mnist:target-train", "mnist:test", 3, 64),
        "mnist:test",
    ),
}


def strategy_name(method: str, params: dict[str, Any]) -> str:
    if method == "random":
        return "random"
    return f"DRMI {params['init']} a={params['alpha']:g}"


def train_one(job: dict[str, Any]) -> dict[str, Any]:
    """One substitute: runs in a worker process with one torch thread."""
    torch.set_num_threads(1)
    pool = load_dataset(job["pool"], data_root=job["data_root"])
    test = load_dataset(job["test"], data_root=job["data_root"])
    model, _, seconds = train_substitute(
        pool,
        np.asarray(job["indices"]),
        np.asarray(job["labels"]),
        epochs=job["epochs"],
        batch_size=4,
        seed=job["seed"],
    )
    predicted = predict_labels(model, test.images).numpy()
    return {
        **{key: job[key] for key in ("setting", "strategy", "k", "seed", "epochs")},
        "accuracy": float((predicted == test.labels.numpy()).mean()),
        "agreement": float((predicted == np.asarray(job["target_test_labels"])).mean()),
        "train_seconds": round(seconds, 2),
    }


def target_for(spec: TargetSpec, data_root: Path | None, checkpoint_dir: Path) -> torch.nn.Module:
    path = checkpoint_dir / f"{spec.name}.pt"
    if not path.exists():
        print(f"training target {spec.name} ...", flush=True)
        train_target(spec, checkpoint_dir, data_root=data_root)
    checkpoint = load_checkpoint(path)
    print(
        f"target {spec.name}: test accuracy {checkpoint.metrics['test_accuracy']:.4f}", flush=True
    )
    return checkpoint.model


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Substitute accuracy against queries (DRMI Table 3)."
    )
    parser.add_argument(
        "--pools", nargs="+", default=["embedded", "digits"], choices=sorted(SETTINGS)
    )
    parser.add_argument("--ks", nargs="+", type=int, default=[50, 100, 150, 300, 600])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--alphas", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    parser.add_argument("--inits", nargs="+", default=["min-sum", "min-max"])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="summarise the rows trained so far; train nothing",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--checkpoint-dir", type=Path, default=ROOT / "results" / "checkpoints")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "results" / "extraction_vs_queries.json"
    )
    args = parser.parse_args()
    data_root = args.data_root if args.data_root.is_dir() else None
    started = time.perf_counter()

    strategies = [("random", {})] + [
        ("drmi", {"alpha": alpha, "init": init}) for init in args.inits for alpha in args.alphas
    ]
    jobs, selection_seconds = [], {}
    for setting in args.pools:
        pool_spec, target_spec, test_spec = SETTINGS[setting]
        if target_spec.train_data.startswith("mnist:") and data_root is None:
            print(f"skipping {setting}: full MNIST needs --data-root", flush=True)
            continue
        pool = load_dataset(pool_spec, data_root=data_root)
        test = load_dataset(test_spec, data_root=data_root)
        oracle = LocalOracle(target_for(target_spec, data_root, args.checkpoint_dir))
        target_test_labels = oracle.predict_labels(test.images.numpy()).tolist()
        mi_cache: dict = {}  # one MI matrix per class, shared by every alpha, init and k
        for method, params in strategies:
            name = strategy_name(method, params)
            for k in args.ks:
                chosen: dict[int, list[int]] = {}
                for seed in range(args.seeds):
                    key = 0 if method == "drmi" else seed  # DRMI is deterministic: select once
                    if key not in chosen:
                        t0 = time.perf_counter()
                        extra = (
                            {**params, "mi_cache": mi_cache} if method == "drmi" else {"seed": seed}
                        )
                        selector = make_selector(method, **extra)
                        result = selector(pool.images.numpy(), pool.labels.numpy(), k=k)
                        chosen[key] = result.indices.tolist()
                        selection_seconds[f"{setting}/{name}/k={k}/seed={key}"] = round(
                            time.perf_counter() - t0, 2
                        )
                    indices = chosen[key]
                    labels = oracle.predict_labels(pool.images[indices].numpy()).tolist()
                    jobs.append(
                        {
                            "setting": setting, "pool": pool_spec, "test": test_spec, "data_root": data_root,
                            "strategy": name, "k": k, "seed": seed, "indices": indices, "labels": labels,
                            "epochs": args.epochs, "target_test_labels": target_test_labels,
                        }
                    )  # fmt: skip
        print(f"{setting}: selections ready ({len(jobs)} substitutes queued)", flush=True)

    # Every finished substitute is appended to a JSON-lines file at once, so an interrupted run
    # loses nothing: the next run with the same output skips what is already there.
    progress_path = args.output.with_suffix(".rows.jsonl")
    progress_path.parent.mkdir(parents=True, exist_ok=True)
    rows = (
        [json.loads(line) for line in progress_path.read_text().splitlines()]
        if progress_path.exists()
        else []
    )
    done = {(r["setting"], r["strategy"], r["k"], r["seed"], r["epochs"]) for r in rows}
    todo = [
        j for j in jobs if (j["setting"], j["strategy"], j["k"], j["seed"], j["epochs"]) not in done
    ]
    if args.report_only:
        todo = []
    print(
        f"{len(jobs) - len(todo)} substitutes already trained (from {progress_path}), {len(todo)} to go"
    )
    with ProcessPoolExecutor(max_workers=args.workers) as executor, progress_path.open("a") as sink:
        for i, row in enumerate(executor.map(train_one, todo, chunksize=1), 1):
            rows.append(row)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            if i % 10 == 0 or i == len(todo):
                print(f"  {i}/{len(todo)} substitutes trained", flush=True)
    wanted = {(j["setting"], j["strategy"], j["k"], j["seed"], j["epochs"]) for j in jobs}
    rows = [
        r for r in rows if (r["setting"], r["strategy"], r["k"], r["seed"], r["epochs"]) in wanted
    ]

    summary = summarise(rows)
    report = {
        "benchmark": "extraction_vs_queries",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": {"epochs": args.epochs, "batch_size": 4, "seeds": args.seeds, "arch": "lenet5"},
        "summary": summary,
        "rows": rows,
        "selection_seconds": selection_seconds,
        "paper_full_mnist": {
            name: {str(k): v for k, v in row.items()} for name, row in PAPER.items()
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(summary, args.ks)
    args.output.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {args.output} in {report['seconds']} s")
    return 0


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["setting"], row["strategy"], row["k"]), []).append(row)
    summary = []
    for (setting, strategy, k), members in sorted(groups.items()):
        accuracies = [m["accuracy"] for m in members]
        agreements = [m["agreement"] for m in members]
        summary.append(
            {
                "setting": setting, "strategy": strategy, "k": k, "seeds": len(members),
                "accuracy_mean": statistics.fmean(accuracies),
                "accuracy_std": statistics.stdev(accuracies) if len(members) > 1 else 0.0,
                "agreement_mean": statistics.fmean(agreements),
                "agreement_std": statistics.stdev(agreements) if len(members) > 1 else 0.0,
            }
        )  # fmt: skip
    return summary


def to_markdown(summary: list[dict[str, Any]], ks: list[int]) -> str:
    max_seeds = max((row["seeds"] for row in summary), default=0)
    lines = []
    for setting in dict.fromkeys(row["setting"] for row in summary):
        lines += [
            f"### pool: {SETTINGS[setting][0]} (substitute accuracy on {SETTINGS[setting][2]}, mean ± std over seeds; paper's full-MNIST figure in brackets)",
            "",
            "| strategy | " + " | ".join(f"k={k}" for k in ks) + " |",
            "|---|" + "---|" * len(ks),
        ]
        strategies = dict.fromkeys(row["strategy"] for row in summary if row["setting"] == setting)
        for strategy in strategies:
            cells = []
            for k in ks:
                match = [
                    r
                    for r in summary
                    if (r["setting"], r["strategy"], r["k"]) == (setting, strategy, k)
                ]
                if not match:
                    cells.append("")
                    continue
                r = match[0]
                paper = PAPER.get(strategy, {}).get(k)
                cell = f"{r['accuracy_mean']:.2%} ± {r['accuracy_std']:.2%}"
                if r["seeds"] < max_seeds:
                    cell += f" (n={r['seeds']})"
                cells.append(cell + (f" [{paper:.2%}]" if paper else ""))
            lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
