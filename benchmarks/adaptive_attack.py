"""Plain PGD against the adaptive attacker, on a KL-sanitised target simulated in-process
("Less is More", seed 001, issue 9 item 5).

The defence is the paper's framework with self-sanitisation, built here from ``mlcore`` alone
(the service's own build is ``defenses/``): the target (LeNet-5 on the embedded target-train
split) and its sanitised model (trained on the target-train images whose confidence under the
target is at least ``--defence-threshold``); an image is refused when KL(target || sanitised)
exceeds the threshold that lets 90, 95 or 98% of held-out normal images (half the test split)
through, and otherwise answered by the sanitised model.

The attacker buys 300 random pool labels from the target, trains a substitute (30 epochs, batch
4, the extraction defaults) and crafts targeted L-inf PGD examples (eps 0.5, 40 steps) on the
other half of the test split, keeping those that fool its substitute (the range's protocol).
Plain: PGD. Adaptive: the twin is the substitute self-sanitised at ``--twin-threshold`` on the
labels it bought (``attacker.adaptive.build_twin``) and the examples climb the PGD objective minus
``--kl-weight`` x KL(substitute || twin). Figures per pass rate: share of the examples sent that
the defence refuses, and share that get through and fool the target (its answer is the wanted
class). Mean and spread over ``--seeds`` runs (each retrains every model).

    OMP_NUM_THREADS=1 python benchmarks/adaptive_attack.py --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attacker.adaptive import build_twin  # noqa: E402
from attacker.extraction import train_substitute  # noqa: E402
from attacker.transfer import choose_seeds, craft  # noqa: E402
from mlcore.adversarial import PGD, TwinEvasivePGD  # noqa: E402
from mlcore.architectures import build_model  # noqa: E402
from mlcore.checkpoints import Checkpoint  # noqa: E402
from mlcore.datasets import ImageDataset, load_dataset  # noqa: E402
from mlcore.divergences import confident_indices, kl_divergence, pass_rate_threshold  # noqa: E402
from mlcore.training import accuracy, fit, predict_logits, seed_everything  # noqa: E402

PASS_RATES = (0.90, 0.95, 0.98)


def _train(images: torch.Tensor, labels: torch.Tensor, *, epochs: int, seed: int):
    seed_everything(seed)
    return fit(build_model("lenet5"), images, labels, epochs=epochs, batch_size=32, seed=seed)


def _subset(dataset: ImageDataset, index: np.ndarray) -> ImageDataset:
    rows = torch.as_tensor(index)
    return ImageDataset(
        dataset.name, dataset.images[rows], dataset.labels[rows], dataset.num_classes
    )


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    started = time.perf_counter()
    train = load_dataset("mnist-embedded:target-train")
    pool = load_dataset("mnist-embedded:pool")
    test = load_dataset("mnist-embedded:test")
    halves = np.random.default_rng(seed).permutation(len(test))
    normal, seed_set = (_subset(test, np.sort(h)) for h in np.array_split(halves, 2))

    target = _train(train.images, train.labels, epochs=args.target_epochs, seed=seed)
    kept = confident_indices(
        predict_logits(target, train.images), train.labels, args.defence_threshold
    )
    if len(kept) < len(train) // 10:
        raise SystemExit(
            f"--defence-threshold {args.defence_threshold} keeps {len(kept)} of {len(train)} "
            f"images after {args.target_epochs} epochs: too few to train a sanitised model"
        )
    index = torch.as_tensor(kept)
    sanitised = _train(
        train.images[index], train.labels[index], epochs=args.target_epochs, seed=seed
    )
    normal_kl = kl_divergence(
        predict_logits(target, normal.images), predict_logits(sanitised, normal.images)
    )
    thresholds = {rate: pass_rate_threshold(normal_kl, rate) for rate in PASS_RATES}

    bought = np.sort(np.random.default_rng(seed).choice(len(pool), args.k, replace=False))
    images = pool.images[torch.as_tensor(bought)]
    labels = predict_logits(target, images).argmax(dim=1).numpy()
    model, arch_kwargs, _ = train_substitute(pool, bought, labels, seed=seed)
    substitute = Checkpoint(model, "lenet5", arch_kwargs, "mnist-embedded:pool")
    twin = build_twin(substitute, images, labels, threshold=args.twin_threshold, seed=seed)

    rows = torch.as_tensor(choose_seeds(model, seed_set, args.attack_seeds, seed=seed))
    seed_images, seed_labels = seed_set.images[rows].numpy(), seed_set.labels[rows].numpy()
    pgd = PGD(eps=0.5, steps=40, seed=seed)
    attacks = {
        "plain PGD": pgd,
        "adaptive": TwinEvasivePGD(twin=twin.model, kl_weight=args.kl_weight, **pgd.params),
    }
    result: dict = {
        "seed": seed,
        "target_accuracy": accuracy(target, test.images, test.labels),
        "sanitised_kept": len(kept),
        "sanitised_accuracy": accuracy(sanitised, test.images, test.labels),
        "substitute_accuracy": accuracy(model, test.images, test.labels),
        "twin_kept": len(twin.kept),
        "kl_thresholds": {str(rate): value for rate, value in thresholds.items()},
        "attacks": {},
    }
    for name, attack in attacks.items():
        crafted = craft(attack, model, seed_images, seed_labels, targeted=True, num_classes=10)
        sent = crafted.adversarial[crafted.fooled_substitute]
        wanted = crafted.target[crafted.fooled_substitute]
        batch = torch.from_numpy(sent)
        target_logits, sanitised_logits = (
            predict_logits(target, batch),
            predict_logits(sanitised, batch),
        )
        kl = kl_divergence(target_logits, sanitised_logits)
        fooled = sanitised_logits.argmax(dim=1).numpy() == wanted
        twin_kl = kl_divergence(predict_logits(model, batch), predict_logits(twin.model, batch))
        figures = {
            "crafted": len(crafted.target),
            "sent": len(sent),
            "substitute_success": float(crafted.fooled_substitute.mean()),
            "fools_undefended_target": float(
                (target_logits.argmax(dim=1).numpy() == wanted).mean()
            ),
            "mean_kl_substitute_twin": float(twin_kl.mean()),
            "mean_kl_target_sanitised": float(kl.mean()),
        }
        for rate, threshold in thresholds.items():
            refused = kl > threshold
            figures[f"rejected@{rate}"] = float(refused.mean())
            figures[f"through_and_fooled@{rate}"] = float((~refused & fooled).mean())
        result["attacks"][name] = figures
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1%}"
    return f"{statistics.fmean(values):.1%} ± {statistics.stdev(values):.1%}"


def markdown(runs: list[dict], args: argparse.Namespace, command: str) -> str:
    lines = [
        f"`{command}` ({datetime.now(UTC):%Y-%m-%d}; {len(runs)} seeds; target "
        f"{args.target_epochs} epochs, defence threshold {args.defence_threshold}, "
        f"twin threshold {args.twin_threshold}, KL weight "
        f"{args.kl_weight}; {args.attack_seeds} seed images x 9 targets)",
        "",
        "| attack | pass rate | sent / crafted | fools the undefended target | refused | "
        "through and fooled |",
        "|---|---|---|---|---|---|",
    ]
    for name in runs[0]["attacks"]:
        per = [run["attacks"][name] for run in runs]
        for rate in PASS_RATES:
            lines.append(
                f"| {name} | {rate:.0%} | {sum(p['sent'] for p in per)} / "
                f"{sum(p['crafted'] for p in per)} | "
                f"{_mean_sd([p['fools_undefended_target'] for p in per])} | "
                f"{_mean_sd([p[f'rejected@{rate}'] for p in per])} | "
                f"{_mean_sd([p[f'through_and_fooled@{rate}'] for p in per])} |"
            )
    lines += [
        "",
        "| seed | target acc. | sanitised kept / acc. | substitute acc. | twin kept | "
        "KL(sub &#124;&#124; twin) plain / adaptive | KL(target &#124;&#124; sanitised) plain / "
        "adaptive |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        plain, adaptive = run["attacks"]["plain PGD"], run["attacks"]["adaptive"]
        lines.append(
            f"| {run['seed']} | {run['target_accuracy']:.1%} | {run['sanitised_kept']} / "
            f"{run['sanitised_accuracy']:.1%} | {run['substitute_accuracy']:.1%} | "
            f"{run['twin_kept']} | {plain['mean_kl_substitute_twin']:.3f} / "
            f"{adaptive['mean_kl_substitute_twin']:.3f} | "
            f"{plain['mean_kl_target_sanitised']:.3f} / "
            f"{adaptive['mean_kl_target_sanitised']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="runs, each retraining every model")
    parser.add_argument("--k", type=int, default=300, help="labels the attacker buys")
    parser.add_argument("--attack-seeds", type=int, default=50, help="seed images (x9 targets)")
    parser.add_argument("--target-epochs", type=int, default=30)
    # 30 epochs on the 2,500 embedded images: 0.9999999 keeps 790 and 0.999999 keeps 1,168
    # (47%; the paper's self-sanitisation at 0.999999 kept 61% of MNIST); after 10 epochs
    # 0.9999999 keeps 2 images, so the epochs are part of the operating point.
    parser.add_argument("--defence-threshold", type=float, default=0.999999)
    parser.add_argument("--twin-threshold", type=float, default=0.9999999)
    parser.add_argument("--kl-weight", type=float, default=1.0)
    parser.add_argument("--output", type=Path, default=ROOT / "reports" / "adaptive_attack.json")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    torch.set_num_threads(1)
    runs = []
    for seed in range(args.seeds):
        runs.append(run_seed(args, seed))
        print(json.dumps(runs[-1], indent=1), file=sys.stderr)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(runs, indent=2) + "\n", encoding="utf-8")
    command = "OMP_NUM_THREADS=1 python benchmarks/adaptive_attack.py " + " ".join(sys.argv[1:])
    print(markdown(runs, args, command.strip()))


if __name__ == "__main__":
    main()
