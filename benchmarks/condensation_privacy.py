"""Dataset condensation as a privacy defence (issue 11, "The experiment"): test accuracy and
membership-inference AUC / TPR at 0.1% FPR of models hosted by the service, attacked through the
membership challenge API, over several seeds.

Per seed, every target is LeNet-5 on ``mnist-embedded:target-train`` (test: ``mnist-embedded:test``):

- ``real``: the owner's real data, a class-balanced random ``--members`` images (zoo
  ``lenet5-mnist-subset<members>``), the model the poster calls "original";
- ``subset-of-owner``: a random real subset of the condensed set's size (``--ipc`` per class)
  drawn from the same owner pool the condensations draw on, uploaded with that pool declared as
  its members and trained through the training-jobs API (the baseline of Carlini, Feldman and
  Nasr 2022: members are the owner's images, most of which the model never saw);
- ``subset-own-images``: zoo ``lenet5-mnist-subset<ipc*10>``, whose members are only the images
  it trained on (what a random subset leaks about the images it does use);
- ``dm-noise``, ``dm-real``, ``dc-noise``, ``dc-real``: zoo ``lenet5-mnist-<dm|dc><ipc>-<init>``,
  condensed from a pool of ``members / 10`` real images per class (their members);
- ``dm-noise-uploaded``: the same DM set as ``dm-noise``, written as ``defender condense`` does
  (npz with its provenance), uploaded and trained through the training-jobs API.

All are served with the ``probabilities:6`` output policy (probabilities to 6 decimals; the
plain ``probabilities`` rounds to 2, which ties most confident answers) and no detectors. Each attack plays one
challenge of ``--n`` balanced candidates per target and seed (fewer where a target has fewer
members); shadow models (shadow, LiRA) are trained once per seed on the attacker's pool and
shared by both attacks; condensed sets and checkpoints are cached under ``--cache-dir``.

    OMP_NUM_THREADS=1 python benchmarks/condensation_privacy.py --quick
    OMP_NUM_THREADS=1 python benchmarks/condensation_privacy.py --seeds 0 1 2

Writes ``<out>.json`` (every challenge's figures) and ``<out>.md`` (the table) after each seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import attacker.membership.lira as lira_module  # noqa: E402
import attacker.membership.shadow as shadow_module  # noqa: E402
import target_service.member_sets as member_sets  # noqa: E402
from attacker.membership.challenge import play_challenge  # noqa: E402
from defenses.condensation import CondensationConfig, condense  # noqa: E402
from defenses.condensation.common import class_pools, save_npz  # noqa: E402
from mlcore.checkpoints import load_checkpoint  # noqa: E402
from mlcore.client import ServiceClient  # noqa: E402
from mlcore.datasets import ImageDataset, balanced_subset_indices, load_dataset  # noqa: E402
from target_service.member_sets import derived_name  # noqa: E402
from target_service.testing import LiveServer  # noqa: E402
from target_service.zoo import checkpoint_path, target_spec, train_target  # noqa: E402

BASE = "lenet5-mnist"
ATTACKS = ("threshold", "shadow", "lira", "gap", "augmentation")
SHADOW_ATTACKS = ("shadow", "lira")
CONDENSED = (("dm", "noise"), ("dm", "real"), ("dc", "noise"), ("dc", "real"))
UPLOADED_EPOCHS = 200  # the training-jobs API's most
ROWS = (
    "real", "subset-own-images", "subset-of-owner",
    *(f"{method}-{init}" for method, init in CONDENSED), "dm-noise-uploaded",
)  # fmt: skip
POLICY = "probabilities:6"  # the finest the service serves (plain "probabilities" rounds to 2)
POSTER = {"real": "MIA about 62%", "dm-noise": "about 41% (condensed)"}


def condensation_config(args: argparse.Namespace, method: str, init: str, seed: int) -> Any:
    iterations = args.dm_iterations if method == "dm" else args.dc_iterations
    return CondensationConfig(
        method=method,  # type: ignore[arg-type]
        ipc=args.ipc,
        init=init,  # type: ignore[arg-type]
        iterations=iterations,
        seed=seed,
        pool_per_class=args.members // 10,
        outer_loop=args.dc_outer if method == "dc" else None,
    )


def caching_condense(cache: Path) -> Callable[..., Any]:
    """``condense`` that also writes each condensed set as ``defender condense`` does (npz with
    provenance), so the uploaded row reuses the zoo row's set instead of condensing again."""

    def run(dataset: ImageDataset, config: CondensationConfig, **kwargs: Any) -> Any:
        condensed = condense(dataset, config, **kwargs)
        save_npz(
            condensed_path(cache, config),
            condensed.images,
            condensed.labels,
            condensed.provenance(),
        )
        print(f"  condensed {config.method}/{config.init} in {condensed.seconds:.0f} s", flush=True)
        return condensed

    return run


def condensed_path(cache: Path, config: CondensationConfig) -> Path:
    return cache / f"condensed-{config.method}{config.ipc}-{config.init}.npz"


def caching_shadows() -> Callable[..., Any]:
    """``train_shadows`` memoised on its settings: the shadow and LiRA attacks of one seed
    train the same shadow models (same pool, seed and count), so train them once."""
    trained: dict[str, Any] = {}
    original = shadow_module.train_shadows

    def run(settings: Any, *, image_shape: tuple[int, ...], progress: Any = None) -> Any:
        key = json.dumps(
            {**dataclasses.asdict(settings), "shape": list(image_shape)},
            sort_keys=True,
            default=str,
        )
        if key not in trained:
            trained[key] = original(settings, image_shape=image_shape)
        return trained[key]

    return run


def hosted_targets(args: argparse.Namespace, seed: int, cache: Path) -> dict[str, str]:
    """Train (or find cached) the zoo targets of one seed; returns row -> hosted name."""
    names = {
        "real": derived_name(BASE, member_count=args.members),
        "subset-own-images": derived_name(BASE, member_count=args.ipc * 10),
    }
    for method, init in CONDENSED:
        names[f"{method}-{init}"] = derived_name(BASE, method=method, ipc=args.ipc, init=init)
    names = {row: name for row, name in names.items() if row in args.rows}
    for row, name in names.items():
        if checkpoint_path(cache, name).exists():
            continue
        spec = dataclasses.replace(target_spec(name), seed=seed)
        if spec.condensation is not None:
            config = condensation_config(
                args, spec.condensation.method, spec.condensation.init, seed
            )
            spec = dataclasses.replace(spec, condensation=config)
        started = time.perf_counter()
        train_target(spec, cache, epochs=args.epochs)
        print(f"  trained {row} ({name}) in {time.perf_counter() - started:.0f} s", flush=True)
    return names


def owner_subset_npz(args: argparse.Namespace, seed: int, cache: Path) -> Path:
    """``ipc`` random real images per class from the condensations' owner pool, declaring the
    whole pool as members (the population the condensed rows are attacked on)."""
    path = cache / f"subset{args.ipc * 10}-of-owner.npz"
    if path.exists():
        return path
    train = load_dataset(target_spec(BASE).train_data)
    config = condensation_config(args, "dm", "real", seed)
    pools = class_pools(train.labels, train.num_classes, config)
    members = torch.cat(pools).sort().values
    pool_labels = train.labels[members]
    chosen = members[balanced_subset_indices(pool_labels, args.ipc * 10, seed=seed)]
    provenance = {"members": {"dataset": train.name, "indices": members.tolist()}}
    np.savez(
        path,
        images=train.images[chosen].numpy(),
        labels=train.labels[chosen].numpy(),
        provenance=np.array(json.dumps(provenance)),
    )
    return path


def uploaded_targets(
    args: argparse.Namespace, seed: int, cache: Path, service: ServiceClient, test_id: str
) -> dict[str, dict[str, Any]]:
    """Upload the DM noise set and the owner subset and train them through the training-jobs
    API; returns row -> the finished job."""
    config = condensation_config(args, "dm", "noise", seed)
    dm_noise = condensed_path(cache, config)
    if "dm-noise-uploaded" in args.rows and not dm_noise.exists():  # its set was not cached
        caching_condense(cache)(load_dataset(target_spec(BASE).train_data), config)
    uploads = {
        "dm-noise-uploaded": dm_noise,
        "subset-of-owner": owner_subset_npz(args, seed, cache),
    }
    jobs = {}
    for row, path in uploads.items():
        dataset_id = service.upload_dataset(path, name=row)["dataset_id"]
        queued = service.submit_job(
            dataset_id=dataset_id,
            test_dataset_id=test_id,
            arch="lenet5",
            recipe={"epochs": args.upload_epochs, "batch_size": 32, "seed": seed},
            name=row,
            output_policy=POLICY,
            detectors={},
        )
        jobs[row] = queued
    for row, queued in jobs.items():
        job = service.wait_for_job(queued["job_id"], poll=1.0)
        if job["status"] != "succeeded":
            raise SystemExit(f"the {row} job ended {job['status']}: {job.get('error')}")
        jobs[row] = job
        print(f"  trained {row} ({job['model']}) through the jobs API", flush=True)
    return jobs


def attack_params(args: argparse.Namespace, attack: str, seed: int) -> dict[str, Any]:
    if attack in SHADOW_ATTACKS:
        return {"seed": seed, "shadows": args.shadows, "epochs": args.shadow_epochs}
    return {}


def run_seed(args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    cache = args.cache_dir / (
        f"seed{seed}-m{args.members}-ipc{args.ipc}-dm{args.dm_iterations}-dc{args.dc_iterations}"
        f"x{args.dc_outer}"
        f"-e{args.epochs}"
    )
    cache.mkdir(parents=True, exist_ok=True)
    member_sets.condense = caching_condense(cache)  # type: ignore[attr-defined]
    names = hosted_targets(args, seed, cache)
    workdir = Path(tempfile.mkdtemp(prefix="bench-condensation-privacy-"))
    env = {
        "output_policies": dict.fromkeys(names.values(), POLICY),
        "detectors": {name: {} for name in names.values()},
        "training_workers": 1,
        "calibration_clients": 0,
    }
    rows: list[dict[str, Any]] = []
    with LiveServer(
        checkpoint_dir=cache, state_dir=workdir / "state", models=list(names.values()), env=env
    ) as server:
        admin = server.client(headers=server.admin_headers)
        created = admin.post(
            "/v1/admin/clients",
            json={"name": "owner", "budget": 10**9, "training_quota": 10**9},
        ).json()
        with ServiceClient(server.url, created["api_key"]) as service:
            test = load_dataset(target_spec(BASE).test_data)
            test_path = workdir / "test.npz"
            np.savez(test_path, images=test.images.numpy(), labels=test.labels.numpy())
            test_id = service.upload_dataset(test_path, name="test")["dataset_id"]
            jobs = uploaded_targets(args, seed, cache, service, test_id)
        targets = {
            row: (name, load_checkpoint(checkpoint_path(cache, name)).metrics["test_accuracy"])
            for row, name in names.items()
        }
        targets.update(
            {row: (job["model"], job["metrics"]["test_accuracy"]) for row, job in jobs.items()}
        )
        for attack in args.attacks:  # every target per attack: a stopped run has whole columns
            for row, (model, test_accuracy) in targets.items():
                n = min(args.n, 2 * args.ipc * 10) if row == "subset-own-images" else args.n
                opened = admin.post(
                    "/v1/admin/membership-challenges",
                    json={"model": model, "client_id": created["client_id"], "n": n, "seed": seed},
                )
                if opened.status_code != 201:
                    raise SystemExit(f"opening a challenge on {model} failed: {opened.text}")
                started = time.perf_counter()
                report = play_challenge(
                    server.url,
                    created["api_key"],
                    opened.json()["challenge_id"],
                    attack,
                    attack_params(args, attack, seed),
                    workdir / "reports" / row / attack,
                )
                result = {
                    "seed": seed, "row": row, "model": model, "attack": attack,
                    "test_accuracy": test_accuracy, "candidates": n,
                    "seconds": round(time.perf_counter() - started, 1),
                    **{k: report[k] for k in ("auc", "balanced_accuracy", "tpr_at_01pct_fpr", "tpr_at_1pct_fpr", "queries_paid", "queries_replayed")},
                }  # fmt: skip
                print(json.dumps(result), flush=True)
                rows.append(result)
        admin.close()
    return rows


def spread(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    seeds = sorted({r["seed"] for r in results})
    order = list(dict.fromkeys(r["row"] for r in results))
    attacks = [a for a in args.attacks if any(r["attack"] == a for r in results)]
    header = ["target", "test accuracy %"]
    for attack in attacks:
        header += [f"{attack} AUC", f"{attack} TPR@0.1%FPR %"]
    header += ["threshold bal. acc. %", "poster"]
    lines = [
        f"Seeds {seeds}; mean ± standard deviation over seeds.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in order:
        mine = [r for r in results if r["row"] == row]
        accuracy = [r["test_accuracy"] for r in mine if r["attack"] == attacks[0]]
        cells = [row, spread(accuracy, 100, 1)]
        for attack in attacks:
            chosen = [r for r in mine if r["attack"] == attack]
            cells += [
                spread([r["auc"] for r in chosen]),
                spread([r["tpr_at_01pct_fpr"] for r in chosen], 100, 1),
            ]
        threshold = [r["balanced_accuracy"] for r in mine if r["attack"] == "threshold"]
        cells += [spread(threshold, 100, 1) if threshold else "-", POSTER.get(row, "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def merge(paths: list[Path], out: Path) -> None:
    """One table from runs of the same settings on other seeds."""
    runs = [json.loads(path.read_text()) for path in paths]
    settings = [
        {k: v for k, v in run["settings"].items() if k not in ("seeds", "out")} for run in runs
    ]
    if any(other != settings[0] for other in settings[1:]):
        raise SystemExit(f"the runs to merge differ in their settings: {settings}")
    results = [result for run in runs for result in run["results"]]
    args = argparse.Namespace(attacks=runs[0]["settings"]["attacks"])
    payload = {
        "commands": [run["command"] for run in runs],
        "started": [run["started"] for run in runs],
        "settings": settings[0],
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(results, args))
    print(markdown(results, args))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--members", type=int, default=1000, help="owner's real images [1000]")
    parser.add_argument("--ipc", type=int, default=10, help="condensed images per class [10]")
    parser.add_argument("--dm-iterations", type=int, default=20)
    parser.add_argument("--dc-iterations", type=int, default=2)
    parser.add_argument(
        "--dc-outer", type=int, default=None, help="DC outer loop [the method's: 10]"
    )
    parser.add_argument("--epochs", type=int, default=None, help="zoo epochs [the spec's]")
    parser.add_argument("--upload-epochs", type=int, default=UPLOADED_EPOCHS)
    parser.add_argument("--n", type=int, default=1000, help="candidates per challenge [1000]")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="targets")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--shadows", type=int, default=8, help="shadow models (shadow, LiRA)")
    parser.add_argument("--shadow-epochs", type=int, default=15)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "results" / "condensation_cache")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "condensation_privacy")
    parser.add_argument("--quick", action="store_true", help="one seed, tiny settings (minutes)")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="only merge the .json of runs of other seeds (e.g. run in parallel) into --out",
    )
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out)
        return
    if args.quick:
        args.seeds, args.dm_iterations, args.dc_iterations, args.dc_outer = [0], 2, 1, 1
        args.n, args.shadows, args.shadow_epochs, args.upload_epochs = 200, 2, 3, 50
        args.out = args.out.with_name(args.out.name + "_quick")
    if args.members % 10 or not 10 <= args.members <= 2500:
        parser.error(f"--members must be a multiple of 10 in 10..2500, got {args.members}")
    if not 1 <= args.ipc <= args.members // 10:
        parser.error(f"--ipc must be in 1..{args.members // 10}, got {args.ipc}")
    if args.n % 2 or not 2 <= args.n <= 2 * args.members:
        parser.error(f"--n must be even, in 2..{2 * args.members}, got {args.n}")
    shared = caching_shadows()
    shadow_module.train_shadows = shared  # type: ignore[assignment]
    lira_module.train_shadows = shared  # type: ignore[assignment]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results: list[dict[str, Any]] = []
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        results += run_seed(args, seed)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        payload = {
            "command": "python benchmarks/condensation_privacy.py " + " ".join(sys.argv[1:]),
            "started": started,
            "settings": settings,
            "results": results,
        }
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(results, args))
    print(markdown(results, args))


if __name__ == "__main__":
    main()
