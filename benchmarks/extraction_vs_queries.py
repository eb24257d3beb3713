"""DRMI paper Table 3 / Figure 3 and Tables 11-13 (and the Table 6 cross-distribution setting),
with every strategy the range has, on this machine.

For each pool and budget k, every registered strategy (``benchmarks/strategies.py`` finds them:
each selector, DRMI for each alpha and init, the adaptive strategies, JbDA, and ART's
KnockoffNets-random and CopycatCNN as a peer cross-check) buys k labels from a LocalOracle of the
target; a LeNet-5 substitute is trained on them (Adam 1e-3, batch 4; JbDA and ART train their
own) once per seed, and with ``--semi-supervised`` (the default) again on the same labels plus
the unlabeled rest of the pool (``attacker/semi_supervised.py``). We report test accuracy and
agreement with the target, mean and std over seeds; the paper's figures are printed beside ours.
Same target, same pool, same seeds for every strategy.

    python benchmarks/extraction_vs_queries.py                      # embedded MNIST + digits pools
    python benchmarks/extraction_vs_queries.py --pools mnist --data-root ../shared/data
    python benchmarks/extraction_vs_queries.py --quick              # a few minutes: a smoke run

Writes results/extraction_vs_queries.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attacker.extraction import train_substitute  # noqa: E402
from attacker.oracle import LocalOracle  # noqa: E402
from attacker.semi_supervised import train_semi_supervised  # noqa: E402
from benchmarks.job_pool import run_jobs  # noqa: E402
from benchmarks.rows_file import read_rows  # noqa: E402
from benchmarks.strategies import Strategy, discover  # noqa: E402
from mlcore.checkpoints import load_checkpoint  # noqa: E402
from mlcore.datasets import balanced_subset_indices, load_dataset  # noqa: E402
from mlcore.training import predict_labels  # noqa: E402
from target_service.zoo import TARGETS, TargetSpec, train_target  # noqa: E402

SEMI = " + semi-supervised"

# DRMI paper, full MNIST, LeNet-5: Table 3 and Section 5.2 (50 queries from the text) for DRMI
# and random; Tables 11-13 for the comparison strategies (HCP / LCP and the K-means variants on
# the target's own probabilities; TRACE at 600 only, min-sum initialisation).
PAPER = {
    "DRMI min-sum a=2": {50: 0.82, 150: 0.9213, 300: 0.9429, 600: 0.9584},
    "DRMI min-sum a=1": {150: 0.8801, 300: 0.9374, 600: 0.9559},
    "DRMI min-sum a=4": {150: 0.9135, 300: 0.9409, 600: 0.9638},
    "DRMI min-max a=1": {150: 0.8707, 300: 0.9199, 600: 0.9552},
    "DRMI min-max a=2": {150: 0.9015, 300: 0.9349, 600: 0.9601},
    "DRMI min-max a=4": {150: 0.9199, 300: 0.9414, 600: 0.9641},
    "random": {150: 0.8497, 300: 0.8848, 600: 0.9191},
    "cmal": {150: 0.8332, 300: 0.8981, 600: 0.9016},
    "kmeans": {150: 0.7982, 300: 0.8845, 600: 0.9353},
    "pca-kmeans": {150: 0.8031, 300: 0.8805, 600: 0.9172},
    "hcp": {600: 0.9096},
    "lcp": {600: 0.7759},
    "trace-min": {600: 0.6721},
    "trace-max": {600: 0.7910},
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


def run_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    """One strategy, budget and seed: buy (unless the labels came with the job), train the
    substitute (and its semi-supervised twin), evaluate. Runs in a worker with one torch thread."""
    torch.set_num_threads(1)
    strategy = Strategy(**job["strategy"])
    pool = load_dataset(job["pool"], data_root=job["data_root"])
    if job.get("pool_indices") is not None:
        pool = pool.subset(job["pool_indices"])
    test = load_dataset(job["test"], data_root=job["data_root"])
    if job.get("indices") is not None:
        indices, labels, paid, substitute = (
            np.asarray(job["indices"]),
            np.asarray(job["labels"]),
            len(job["indices"]),
            None,
        )
    else:
        oracle = LocalOracle.from_checkpoint(job["target"])
        bought = strategy.buy(oracle, pool, k=job["k"], seed=job["seed"], epochs=job["epochs"])
        indices, labels, paid, substitute = (
            bought.indices,
            bought.labels,
            oracle.meter.paid,
            bought.substitute,
        )
    rows = []
    models: list[tuple[str, Any, float]] = []
    if substitute is not None:  # JbDA and ART train their own
        models.append((strategy.name, substitute, 0.0))
    else:
        model, _, seconds = train_substitute(
            pool, indices, labels, epochs=job["epochs"], batch_size=4, seed=job["seed"]
        )
        models.append((strategy.name, model, seconds))
    if job["semi"] and strategy.uses_pool_indices:
        model, _, seconds = train_semi_supervised(
            pool, indices, labels, epochs=job["epochs"], seed=job["seed"]
        )
        models.append((strategy.name + SEMI, model, seconds))
    for name, model, seconds in models:
        predicted = predict_labels(model, test.images).numpy()
        rows.append(
            {
                "setting": job["setting"], "strategy": name, "k": job["k"], "seed": job["seed"],
                "epochs": job["epochs"], "queries_paid": int(paid),
                "accuracy": float((predicted == test.labels.numpy()).mean()),
                "agreement": float((predicted == np.asarray(job["target_test_labels"])).mean()),
                "train_seconds": round(seconds, 2),
            }
        )  # fmt: skip
    return rows


def target_for(spec: TargetSpec, data_root: Path | None, checkpoint_dir: Path) -> Path:
    path = checkpoint_dir / f"{spec.name}.pt"
    if not path.exists():
        print(f"training target {spec.name} ...", flush=True)
        train_target(spec, checkpoint_dir, data_root=data_root)
    checkpoint = load_checkpoint(path)
    print(
        f"target {spec.name}: test accuracy {checkpoint.metrics['test_accuracy']:.4f}", flush=True
    )
    return path


def expected_rows(job: dict[str, Any]) -> list[tuple]:
    strategy = Strategy(**job["strategy"])
    names = [strategy.name] + (
        [strategy.name + SEMI] if job["semi"] and strategy.uses_pool_indices else []
    )
    return [(job["setting"], name, job["k"], job["seed"], job["epochs"]) for name in names]


def seed_major(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every strategy and budget for seed 0 first, then seed 1, ...: a run cut short still has
    every row of the table, with fewer seeds (the cells say n=)."""
    return sorted(jobs, key=lambda job: (job["seed"], job["k"]))


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Substitute accuracy against queries, every strategy (DRMI Tables 3, 11-13)."
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
        "--strategies", nargs="+", default=None,
        help="only these strategies (names as in the table); default: every registered one",
    )  # fmt: skip
    parser.add_argument(
        "--semi-supervised", action=argparse.BooleanOptionalAction, default=True,
        help="also train each pool strategy's substitute semi-supervised (its own rows)",
    )  # fmt: skip
    parser.add_argument(
        "--art", action=argparse.BooleanOptionalAction, default=True,
        help="ART's KnockoffNets (random) and CopycatCNN rows (needs the [art] extra)",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help="a smoke run: embedded pool, k 50 and 150, 2 seeds, 10 epochs, DRMI min-sum a=2",
    )  # fmt: skip
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="summarise the rows trained so far; train nothing",
    )
    parser.add_argument(
        "--pool-size", type=int, default=None,
        help="a seeded class-balanced subset of this many pool images, the same for every "
        "strategy and seed (full MNIST: DRMI's MI matrices and TRACE over 60,000 images do "
        "not fit a 2-core machine); default: the whole pool",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--checkpoint-dir", type=Path, default=ROOT / "results" / "checkpoints")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "results" / "extraction_vs_queries.json"
    )
    args = parser.parse_args()
    if args.quick:
        args.pools, args.ks, args.seeds, args.epochs = ["embedded"], [50, 150], 2, 10
        args.alphas, args.inits = [2.0], ["min-sum"]
        if args.output == parser.get_default("output"):
            args.output = ROOT / "results" / "extraction_vs_queries_quick.json"
    data_root = args.data_root if args.data_root.is_dir() else None
    started = time.perf_counter()

    strategies = discover(alphas=tuple(args.alphas), inits=tuple(args.inits), art=args.art)
    if args.strategies is not None:
        unknown = sorted(set(args.strategies) - {s.name for s in strategies})
        if unknown:
            known = ", ".join(s.name for s in strategies)
            parser.error(f"unknown --strategies {unknown}; known: {known}")
        strategies = [s for s in strategies if s.name in args.strategies]
    print("strategies: " + ", ".join(s.name for s in strategies), flush=True)
    jobs: list[dict[str, Any]] = []
    selection_seconds: dict[str, float] = {}
    for setting in args.pools:
        pool_spec, target_spec, test_spec = SETTINGS[setting]
        if target_spec.train_data.startswith("mnist:") and data_root is None:
            print(f"skipping {setting}: full MNIST needs --data-root", flush=True)
            continue
        pool = load_dataset(pool_spec, data_root=data_root)
        pool_indices = None
        if args.pool_size is not None and args.pool_size < len(pool):
            pool_indices = balanced_subset_indices(pool.labels, args.pool_size, seed=0).tolist()
            pool = pool.subset(pool_indices)
        test = load_dataset(test_spec, data_root=data_root)
        target_path = target_for(target_spec, data_root, args.checkpoint_dir)
        oracle = LocalOracle.from_checkpoint(target_path)
        target_test_labels = oracle.predict_labels(test.images.numpy()).tolist()
        mi_cache: dict = {}  # one MI matrix per class, shared by every alpha, init and k
        for strategy in strategies:
            for k in args.ks:
                if k < strategy.min_k or k > len(pool):
                    print(f"{setting}: {strategy.name} cannot run at k={k}", flush=True)
                    continue
                bought = None
                if strategy.deterministic:  # DRMI: select once here, with the MI cache
                    t0 = time.perf_counter()
                    bought = strategy.buy(oracle, pool, k=k, seed=0, mi_cache=mi_cache)
                    selection_seconds[f"{setting}/{strategy.name}/k={k}"] = round(
                        time.perf_counter() - t0, 2
                    )
                for seed in range(args.seeds):
                    jobs.append(
                        {
                            "setting": setting, "pool": pool_spec, "pool_indices": pool_indices, "test": test_spec, "data_root": data_root,
                            "target": str(target_path), "strategy": asdict(strategy), "k": k, "seed": seed,
                            "epochs": args.epochs, "semi": args.semi_supervised,
                            "target_test_labels": target_test_labels,
                            "indices": None if bought is None else bought.indices.tolist(),
                            "labels": None if bought is None else bought.labels.tolist(),
                        }
                    )  # fmt: skip
        print(f"{setting}: {len(jobs)} jobs queued", flush=True)

    # Every finished job's rows are appended to a JSON-lines file at once, so an interrupted run
    # loses nothing: the next run with the same output skips what is already there.
    progress_path = args.output.with_suffix(".rows.jsonl")
    rows = read_rows(progress_path)
    done = {(r["setting"], r["strategy"], r["k"], r["seed"], r["epochs"]) for r in rows}
    todo = seed_major([j for j in jobs if not set(expected_rows(j)) <= done])
    if args.report_only:
        todo = []
    print(f"{len(jobs) - len(todo)} jobs already done (from {progress_path}), {len(todo)} to go")
    finished_rows = run_jobs(run_job, todo, workers=args.workers, rows_path=progress_path)
    for i, job_rows in enumerate(finished_rows, 1):
        rows += job_rows
        if i % 10 == 0 or i == len(todo):
            print(f"  {i}/{len(todo)} jobs done", flush=True)
    wanted = {key for j in jobs for key in expected_rows(j)}
    rows = [
        r for r in rows if (r["setting"], r["strategy"], r["k"], r["seed"], r["epochs"]) in wanted
    ]

    summary = summarise(rows)
    report = {
        "benchmark": "extraction_vs_queries",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": {
            "epochs": args.epochs,
            "batch_size": 4,
            "seeds": args.seeds,
            "arch": "lenet5",
            "strategies": [asdict(s) for s in strategies],
            "semi_supervised": args.semi_supervised,
            "pool_size": args.pool_size,
        },
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
    markdown = to_markdown(summary, args.ks, args.pool_size)
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
                "queries_paid_max": max(m.get("queries_paid", k) for m in members),
                "accuracy_mean": statistics.fmean(accuracies),
                "accuracy_std": statistics.stdev(accuracies) if len(members) > 1 else 0.0,
                "agreement_mean": statistics.fmean(agreements),
                "agreement_std": statistics.stdev(agreements) if len(members) > 1 else 0.0,
            }
        )  # fmt: skip
    return summary


def to_markdown(summary: list[dict[str, Any]], ks: list[int], pool_size: int | None = None) -> str:
    max_seeds = max((row["seeds"] for row in summary), default=0)
    lines = []
    for setting in dict.fromkeys(row["setting"] for row in summary):
        for figure, title in (
            ("accuracy", f"substitute accuracy on {SETTINGS[setting][2]}"),
            ("agreement", f"agreement with the target on {SETTINGS[setting][2]}"),
        ):
            lines += [
                f"### pool: {SETTINGS[setting][0]}"
                + (f" ({pool_size:,}-image class-balanced subset)" if pool_size else "")
                + f" ({title}, mean ± std over seeds"
                + ("; the paper's full-MNIST figure in brackets)" if figure == "accuracy" else ")"),
                "",
                "| strategy | " + " | ".join(f"k={k}" for k in ks) + " |",
                "|---|" + "---|" * len(ks),
            ]
            strategies = dict.fromkeys(r["strategy"] for r in summary if r["setting"] == setting)
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
                    cell = f"{r[figure + '_mean']:.2%}"
                    if r["seeds"] > 1:  # one seed has no spread to show
                        cell += f" ± {r[figure + '_std']:.2%}"
                    if r["seeds"] < max_seeds:
                        cell += f" (n={r['seeds']})"
                    if r["queries_paid_max"] != k:
                        cell += f" ({r['queries_paid_max']} paid)"
                    paper = PAPER.get(strategy, {}).get(k) if figure == "accuracy" else None
                    cells.append(cell + (f" [{paper:.2%}]" if paper else ""))
                lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
