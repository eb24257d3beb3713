"""Unlearnable examples against the range's trainers and thieves (issue 12, rows 2 to 7).

A data owner protects its images with each registered method (``defenses.unlearnable.METHODS``)
at each eps; for each seed we then measure, on the clean test set:

- row 2: the clean test accuracy of a linear model, DNN5, LeNet-5, C3F2 (and ResNet-18 with
  ``--archs``) trained on the protected images with their true labels (MI-UE's Fig. 2 depth curve);
- row 4: the label-agnostic trainer: K-means pseudo-labels (5 or 20 classes, UC's Fig. 4a) on the
  protected pixels, a LeNet-5 trained on them, each pseudo-class read as the true class most of its
  training members have (the most a trainer could make of them);
- row 5: the trainer's countermeasures with LeNet-5 (UC Table 3): Gaussian noise, Cutout, Mixup,
  CutMix, JPEG compression, PGD adversarial training;
- row 7: MI-UE's thesis: the mutual information between the clean and the protected images'
  penultimate features of a LeNet-5 trained on the clean images (a histogram estimator per
  feature, averaged over features) against the accuracy drop;
- row 3 (UC Table 2 analog): a real ``target-service serve`` (``LiveServer``, a temporary state
  folder); the protected set is uploaded through ``mlcore.client`` and LeNet-5 trained on it with
  each ``--recipes`` recipe of the training-jobs API (its settings, the run's seed); the hosted
  model's clean test accuracy, predicted over HTTP;
- row 6: model stealing from a protected pool: the protected images are the attacker's pool; it
  buys the labels of the clean target the same service hosts (``lenet5-mnist``) over HTTP for
  k of them (``--steal-ks``; random and DRMI selection) and trains a LeNet-5 substitute; its
  clean test accuracy and agreement with the target, the transferability of targeted PGD
  examples (128/255) crafted on it (``transferability_all``, sent to the target over HTTP) and
  the mean pairwise MI within each class (DRMI's Eq. 1) of the pool and of the selected set.
  (``benchmarks/unlearnable_service.py`` holds rows 3 and 6.)

The clean baseline (method ``clean``) runs in the same run (unless ``--no-clean``); the same
protected images serve every row of a (method, eps, seed). Explicit options win over ``--quick``'s.

    python benchmarks/unlearnable.py --quick                      # embedded split, a smoke run
    python benchmarks/unlearnable.py --rows 4 5 --seeds 2 --eps 32/255   # the trainer's side
    python benchmarks/unlearnable.py --quick --rows 3 6 --size 300 --seeds 1 --steal-ks 100 300
    python benchmarks/unlearnable.py --data-root ../shared/data   # full MNIST, 10,000 protected

Writes results/unlearnable.json (rows resumable: results/unlearnable.rows.jsonl) and .md. A job
counts as done per (method, eps, seed, epochs, row): re-running with other ``--recipes`` or
``--steal-ks`` needs another ``--output``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.job_pool import run_jobs  # noqa: E402
from benchmarks.rows_file import read_rows  # noqa: E402
from benchmarks.unlearnable_service import (  # noqa: E402
    RECIPE_NAMES,
    SELECTIONS,
    STEAL_KS,
    TARGET,
    Service,
    account_name,
    as_dataset,
    cap_ks,
    check_ks,
    hosted_labels,
    save_npz,
    start_service,
    stealing_rows,
    training_api_rows,
)
from defenses.unlearnable import METHODS  # noqa: E402
from defenses.unlearnable.surrogate import penultimate_features  # noqa: E402
from mlcore.adversarial import PGD  # noqa: E402
from mlcore.architectures import arch_kwargs_for, build_model  # noqa: E402
from mlcore.datasets import balanced_subset_indices, load_dataset  # noqa: E402
from mlcore.training import accuracy, fit, predict_labels, seed_everything  # noqa: E402

# Published figures (issue 12): UC Table 1 (Pets, ResNet-18), UC Table 3 (countermeasures against
# UC on Pets), error-minimising noise on CIFAR-10 (Huang et al.), and the issue's own quick MNIST
# run (10,000 images, LeNet-5, 10 epochs, 32/255) that this benchmark sets out to improve on.
PAPER = {
    "UC, Pets, ResNet-18 (UC Table 1)": {"clean": 0.6231, "uc": 0.1221},
    "UC against countermeasures, Pets (UC Table 3)": {
        "none": 0.1221, "mixup": 0.1434, "gaussian": 0.2426, "cutmix": 0.1450, "cutout": 0.1235,
    },
    "error-minimising, CIFAR-10 (Huang et al.)": {"em-samplewise": 0.20, "em-classwise": 0.16},
    "issue 12's quick MNIST run, LeNet-5, 32/255": {
        "em-classwise": 0.65, "em-samplewise": 0.94, "naive cluster-wise": 0.98, "random": 0.975,
        "em-classwise, target's labels": 0.89, "em-classwise, PGD adversarial training": 0.97,
    },
}  # fmt: skip

ARCHS = ("linear", "dnn5", "lenet5", "c3f2")
COUNTERMEASURES = ("gaussian", "cutout", "mixup", "cutmix", "jpeg", "pgd-at")
PSEUDO_CLASSES = (5, 20)
ROWS = (2, 3, 4, 5, 6, 7)
# Row 6's fields averaged over seeds beside its value (the substitute's accuracy).
STEALING_FIELDS = ("agreement", "transferability_all", "selected_mi", "pool_mi")
# Fields averaged beside a row's value: row 6's, and row 7's LeNet-5 accuracy (which stands in
# for row 2's when a run measures row 7 without row 2).
AVERAGED_FIELDS = (*STEALING_FIELDS, "lenet5_accuracy")


def parse_eps(text: str) -> float:
    """'32/255' or '0.125' -> float."""
    return float(Fraction(text))


def parse_variant(text: str) -> tuple[str, tuple[str, dict[str, Any]]]:
    """'LABEL=METHOD:JSON' -> (LABEL, (METHOD, options)): a registered method with options,
    reported under its own label so its rows sit beside the method's defaults."""
    label, _, rest = text.partition("=")
    method, _, options_text = rest.partition(":")
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", label) or label in {*METHODS, "clean"}:
        raise ValueError(
            f"--variant {text!r}: LABEL must be a new lower-case name (letters, digits, '-')"
        )
    if method not in METHODS:
        raise ValueError(f"--variant {text!r}: unknown method {method!r}; known: {sorted(METHODS)}")
    try:
        options = json.loads(options_text or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"--variant {text!r}: the options are not JSON ({exc})") from None
    if not isinstance(options, dict):
        raise ValueError(f"--variant {text!r}: the options must be a JSON object")
    return label, (method, options)


def build_victim(arch: str, shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The trainer's model; 'linear' is one linear layer on the pixels (MI-UE Fig. 2's first)."""
    if arch == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), num_classes))
    return build_model(arch, **arch_kwargs_for(arch, shape, num_classes))  # type: ignore[arg-type]


def train_victim(
    arch: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    num_classes: int = 10,
    countermeasure: str | None = None,
    at_eps: float = 32 / 255,
) -> nn.Module:
    """Adam 1e-3, batch 64 (mlcore's loop when there is no countermeasure); a countermeasure
    transforms each batch (JPEG transforms the data set once)."""
    seed_everything(seed)
    model = build_victim(arch, tuple(images.shape[1:]), num_classes)
    if countermeasure == "jpeg":
        images = jpeg(images, quality=10)
    if countermeasure in (None, "jpeg"):
        return fit(model, images, labels, epochs=epochs, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    targets = F.one_hot(labels.long(), num_classes).float()
    attack = PGD(eps=at_eps, steps=5, seed=seed)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            x, y = images[batch], targets[batch]
            if countermeasure == "pgd-at":
                x = attack(model.eval(), x, labels=labels[batch])
            else:
                x, y = augment(countermeasure, x, y, generator)
            model.train()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def augment(
    kind: str | None, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of Gaussian noise (sigma 0.1), Cutout (8x8), Mixup or CutMix (alpha 1)."""
    n, _, height, width = x.shape
    if kind == "gaussian":
        return (x + 0.1 * torch.randn(x.shape, generator=generator)).clamp(0, 1), y
    if kind == "cutout":
        x = x.clone()
        for i in range(n):
            top, left = (
                int(v) for v in torch.randint(0, height - 8 + 1, (2,), generator=generator)
            )
            x[i, :, top : top + 8, left : left + 8] = 0
        return x, y
    lam = float(torch.distributions.Beta(1.0, 1.0).sample()) if kind in ("mixup", "cutmix") else 1
    partner = torch.randperm(n, generator=generator)
    if kind == "mixup":
        return lam * x + (1 - lam) * x[partner], lam * y + (1 - lam) * y[partner]
    if kind == "cutmix":
        cut_h, cut_w = int(height * (1 - lam) ** 0.5), int(width * (1 - lam) ** 0.5)
        top = int(torch.randint(0, height - cut_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - cut_w + 1, (1,), generator=generator))
        x = x.clone()
        x[:, :, top : top + cut_h, left : left + cut_w] = x[
            partner, :, top : top + cut_h, left : left + cut_w
        ]
        kept = 1 - cut_h * cut_w / (height * width)
        return x, kept * y + (1 - kept) * y[partner]
    raise ValueError(f"countermeasure must be one of {COUNTERMEASURES}, got {kind!r}")


def jpeg(images: torch.Tensor, *, quality: int) -> torch.Tensor:
    """Round-trip every image through JPEG at ``quality`` (Pillow's codec)."""
    import io

    from PIL import Image

    squeezed = []
    for image in (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
            buffer, format="JPEG", quality=quality
        )
        decoded = np.asarray(Image.open(buffer)).reshape(image.shape)
        squeezed.append(torch.from_numpy(decoded.copy()).permute(2, 0, 1))
    return torch.stack(squeezed).float() / 255


def pseudo_label_accuracy(
    images: torch.Tensor,
    labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    classes: int,
    epochs: int,
    seed: int,
) -> float:
    """Row 4: K-means pseudo-labels on the pixels, LeNet-5 trained on them, each pseudo-class
    read as its members' majority true class."""
    from sklearn.cluster import KMeans

    pseudo = KMeans(n_clusters=classes, n_init=3, random_state=seed).fit_predict(
        images.flatten(1).numpy()
    )
    pseudo_labels = torch.from_numpy(pseudo.astype("int64"))
    model = train_victim(
        "lenet5", images, pseudo_labels, epochs=epochs, seed=seed, num_classes=classes
    )
    majority = torch.tensor(
        [
            int(torch.mode(labels[pseudo_labels == c]).values) if (pseudo_labels == c).any() else 0
            for c in range(classes)
        ]
    )
    return (majority[predict_labels(model, test_images)] == test_labels).float().mean().item()


def feature_mutual_information(
    clean: torch.Tensor, protected: torch.Tensor, *, bins: int = 20
) -> float:
    """Row 7: histogram MI (nats) between each clean feature and the same feature of the
    protected image, averaged over the features that vary; bin edges are the clean feature's
    quantiles (scikit-learn's ``mutual_info_score`` on the binned values)."""
    from sklearn.metrics import mutual_info_score

    values = []
    for j in range(clean.shape[1]):
        a, b = clean[:, j].numpy(), protected[:, j].numpy()
        edges = np.unique(np.quantile(a, np.linspace(0, 1, bins + 1)[1:-1]))
        if len(edges) == 0:
            continue  # a dead unit carries no information either way
        values.append(mutual_info_score(np.digitize(a, edges), np.digitize(b, edges)))
    return float(np.mean(values)) if values else 0.0


def run_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Protect once, then measure every requested row on the protected set (in a worker)."""
    torch.set_num_threads(1)
    data, _ = load_data(job["data_root"], job["size"])
    method, eps, seed, epochs = job["method"], job["eps"], job["seed"], job["epochs"]
    images, labels = data["images"], data["labels"]
    test_images, test_labels = data["test_images"], data["test_labels"]
    started = time.perf_counter()
    info: dict[str, Any] = {}
    if method == "clean":
        protected = images
    else:
        registered, variant_options = job["variants"].get(method, (method, {}))
        options = {**job["options"].get(registered, {}), **variant_options}
        result = METHODS[registered](images, labels, eps=parse_eps(eps), seed=seed, **options)
        protected, info = result.images, result.info
    craft_seconds = round(time.perf_counter() - started, 1)
    base = {"method": method, "eps": eps, "seed": seed, "epochs": epochs}
    rows: list[dict[str, Any]] = []

    def add(row: int, variant: str, value: float, **extra: Any) -> None:
        rows.append({**base, "row": row, "variant": variant, "value": value, **extra})
        print(f"  {method} {eps} seed {seed} row {row} {variant}: {value:.4f}", flush=True)

    lenet_accuracy = None
    if 2 in job["rows"] or 7 in job["rows"]:
        for arch in job["archs"] if 2 in job["rows"] else ["lenet5"]:
            model = train_victim(arch, protected, labels, epochs=epochs, seed=seed)
            value = accuracy(model, test_images, test_labels)
            lenet_accuracy = value if arch == "lenet5" else lenet_accuracy
            if 2 in job["rows"]:
                add(2, arch, value, craft_seconds=craft_seconds, info=_short(info))
    if 4 in job["rows"]:
        for classes in PSEUDO_CLASSES:
            value = pseudo_label_accuracy(
                protected, labels, test_images, test_labels,
                classes=classes, epochs=epochs, seed=seed,
            )  # fmt: skip
            add(4, f"kmeans-{classes}", value)
    if 5 in job["rows"]:
        at_eps = parse_eps(eps) if method != "clean" else max(map(parse_eps, job["all_eps"]))
        for countermeasure in COUNTERMEASURES:
            model = train_victim(
                "lenet5", protected, labels, epochs=epochs, seed=seed,
                countermeasure=countermeasure, at_eps=at_eps,
            )  # fmt: skip
            add(5, countermeasure, accuracy(model, test_images, test_labels))
    if 7 in job["rows"]:
        reference = train_victim("lenet5", images, labels, epochs=epochs, seed=seed)
        mi = feature_mutual_information(
            penultimate_features(reference, images), penultimate_features(reference, protected)
        )
        add(7, "feature-mi", mi, lenet5_accuracy=lenet_accuracy)
    if 3 in job["rows"] or 6 in job["rows"]:
        service = Service(**job["service"])
        test = as_dataset("test", test_images, test_labels)
        with tempfile.TemporaryDirectory(prefix="unlearnable-") as folder:
            npz = save_npz(Path(folder) / "protected.npz", protected, labels)
            name = account_name(method, eps, seed)
            if 3 in job["rows"]:
                owner = service.open_account(f"{name}-owner")
                for found in training_api_rows(
                    service, owner, npz, test, recipes=job["recipes"], seed=seed, name=name
                ):
                    add(3, found.pop("variant"), found.pop("value"), **found)
            if 6 in job["rows"]:
                thief = service.open_account(f"{name}-thief")
                for found in stealing_rows(
                    service, thief, npz, test, np.asarray(job["target_test_labels"]),
                    ks=job["steal_ks"], selections=list(SELECTIONS), epochs=job["steal_epochs"],
                    transfer_seeds=job["transfer_seeds"], seed=seed,
                ):  # fmt: skip
                    add(6, found.pop("variant"), found.pop("value"), **found)
    return rows


def _short(info: dict[str, Any]) -> dict[str, Any]:
    """The method's facts without per-image lists (cluster ids), for the rows file."""
    return {key: value for key, value in info.items() if key != "clusters"}


@functools.lru_cache(maxsize=1)
def load_data(data_root: Path | None, size: int) -> tuple[dict[str, torch.Tensor], str]:
    """Full MNIST when a data root holds it (a seeded, balanced ``size``-image subset of the
    training set is protected), the embedded split otherwise (its 1,500-image pool, or a
    balanced ``size``-image subset of it when ``size`` is smaller)."""
    if data_root is not None and (data_root / "mnist").is_dir():
        train = load_dataset("mnist:train", data_root=data_root)
        train = train.subset(balanced_subset_indices(train.labels, size, seed=0))
        test = load_dataset("mnist:test", data_root=data_root)
        source = f"mnist:train (balanced {size}-image subset) / mnist:test"
    else:
        train, test = load_dataset("mnist-embedded:pool"), load_dataset("mnist-embedded:test")
        source = "mnist-embedded:pool / mnist-embedded:test"
        if size < len(train):
            train = train.subset(balanced_subset_indices(train.labels, size, seed=0))
            source = f"mnist-embedded:pool (balanced {size}-image subset) / mnist-embedded:test"
    data = {
        "images": train.as_float(),
        "labels": train.labels,
        "test_images": test.as_float(),
        "test_labels": test.labels,
    }
    return data, source


def eps_value(eps: str) -> float:
    """An eps label as a number for ordering ('-', the clean baseline's, first)."""
    return 0.0 if eps == "-" else parse_eps(eps)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, std, min and max of each (row, method, eps, variant)'s value over seeds; row 6's
    entries also carry the means (and ``_std``) of ``STEALING_FIELDS``, row 7's of its LeNet-5
    accuracy."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["row"], row["method"], row["eps"], row["variant"]), []).append(row)
    summary = []
    ordered = sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], eps_value(kv[0][2]), kv[0][3])
    )
    for (row, method, eps, variant), members in ordered:
        values = [member["value"] for member in members]
        entry = {
            "row": row, "method": method, "eps": eps, "variant": variant, "seeds": len(values),
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values),
        }  # fmt: skip
        for field in AVERAGED_FIELDS:
            found = [m[field] for m in members if m.get(field) is not None]
            if found:
                entry[field] = statistics.fmean(found)
                entry[f"{field}_std"] = statistics.stdev(found) if len(found) > 1 else 0.0
        summary.append(entry)
    return summary


def first_eps_below(summary: list[dict[str, Any]], level: float) -> dict[str, str | None]:
    """Per method, the smallest eps at which LeNet-5 (row 2) falls under ``level`` on average."""
    found: dict[str, str | None] = {}
    for entry in sorted(summary, key=lambda e: eps_value(e["eps"])):
        if entry["row"] != 2 or entry["variant"] != "lenet5" or entry["method"] == "clean":
            continue
        found.setdefault(entry["method"], None)
        if found[entry["method"]] is None and entry["mean"] < level:
            found[entry["method"]] = entry["eps"]
    return found


def _stealing_order(entry: dict[str, Any]) -> tuple:
    """Row 6's entries by method, eps and selection, eps and k as numbers ('8/255' < '16/255',
    'drmi k=300' < 'drmi k=1000')."""
    selection, _, k = entry["variant"].partition(" k=")
    return (entry["method"], eps_value(entry["eps"]), selection, int(k) if k.isdigit() else 0)


def to_markdown(summary: list[dict[str, Any]], source: str) -> str:
    def cell(entry: dict[str, Any] | None, percent: bool = True) -> str:
        if entry is None:
            return ""
        scale, unit = (100, "%") if percent else (1, "")
        return f"{entry['mean'] * scale:.1f}{unit} ± {entry['std'] * scale:.1f} ({entry['seeds']})"

    index = {(e["row"], e["method"], e["eps"], e["variant"]): e for e in summary}

    def lenet5(method: str, eps: str) -> dict[str, Any] | None:
        """Row 2's LeNet-5 entry, or (a run without row 2) row 7's LeNet-5 trained the same way."""
        found = index.get((2, method, eps, "lenet5"))
        row7 = index.get((7, method, eps, "feature-mi"))
        if found is None and row7 is not None and "lenet5_accuracy" in row7:
            found = {"mean": row7["lenet5_accuracy"], "std": row7["lenet5_accuracy_std"],
                     "seeds": row7["seeds"]}  # fmt: skip
        return found

    settings = list(dict.fromkeys((e["method"], e["eps"]) for e in summary))
    lines = [f"Data: {source}. Mean ± std over seeds (number of seeds in brackets).", ""]
    for row, title, variants in (
        (2, "Row 2: clean test accuracy of a trainer on the protected data", None),
        (
            3,
            "Row 3: the training-jobs API (LeNet-5, per recipe), the hosted model's clean test "
            "accuracy over HTTP",
            None,
        ),
        (4, "Row 4: K-means pseudo-labels (LeNet-5), clean test accuracy", None),
        (5, "Row 5: countermeasures (LeNet-5), clean test accuracy", None),
    ):
        present = variants or list(dict.fromkeys(e["variant"] for e in summary if e["row"] == row))
        if not present:
            continue
        head = ["method", "eps", *present]
        if row == 5:
            head.insert(2, "none")
        lines += [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, eps in settings:
            cells = [cell(index.get((row, method, eps, v))) for v in present]
            if row == 5:
                cells.insert(0, cell(lenet5(method, eps)))
            if any(cells):
                lines.append("| " + " | ".join([method, eps, *cells]) + " |")
        lines.append("")
    if any(e["row"] == 7 for e in summary):
        clean_acc = lenet5("clean", "-")
        lines += [
            "**Row 7: MI between clean and protected penultimate features (LeNet-5 trained on "
            "clean data; histogram, nats per feature) against the LeNet-5 accuracy drop**",
            "",
            "| method | eps | feature MI | LeNet-5 accuracy drop |",
            "|---|---|---|---|",
        ]
        for method, eps in settings:
            mi = index.get((7, method, eps, "feature-mi"))
            acc = lenet5(method, eps)
            drop = (
                f"{(clean_acc['mean'] - acc['mean']) * 100:.1f} points"
                if clean_acc is not None and acc is not None
                else ""
            )
            if mi is not None:
                lines.append(f"| {method} | {eps} | {cell(mi, percent=False)} | {drop} |")
        lines.append("")
    if any(e["row"] == 6 for e in summary):
        lines += [
            f"**Row 6: model stealing from the protected pool (LeNet-5 substitute, labels bought "
            f"from {TARGET} over HTTP); transferability of targeted PGD 128/255 examples crafted "
            "on the substitute (`transferability_all`); mean pairwise MI within each class (nats) "
            "of the selected set and of the pool**",
            "",
            "| method | eps | selection | substitute accuracy | agreement | transferability "
            "| MI selected | MI pool |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e in sorted(summary, key=_stealing_order):
            if e["row"] == 6:
                figures = [
                    f"{e[field] * 100:.1f}%" if field in e else ""
                    for field in ("agreement", "transferability_all")
                ] + [
                    f"{e[field]:.3f}" if field in e else "" for field in ("selected_mi", "pool_mi")
                ]
                lines.append(
                    "| "
                    + " | ".join([e["method"], e["eps"], e["variant"], cell(e), *figures])
                    + " |"
                )
        lines.append("")
    for level in (0.5, 0.2):
        below = first_eps_below(summary, level)
        if below:
            text = ", ".join(f"{m}: {e or 'not at any eps run'}" for m, e in below.items())
            lines.append(f"First eps with LeNet-5 under {level:.0%}: {text}.")
    lines += ["", "**Published figures (not this data set)**", ""]
    for title, figures in PAPER.items():
        lines.append(f"- {title}: " + ", ".join(f"{k} {v * 100:.2f}%" for k, v in figures.items()))
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def serving(checkpoint_dir: Path, data: dict[str, torch.Tensor]) -> Iterator[dict[str, Any]]:
    """Rows 3 and 6: a service hosting the clean target for the whole run; yields what each job
    needs of it (where it is, and the target's labels of the clean test split, bought over HTTP
    once, for row 6's agreement)."""
    from benchmarks.transferability import target_path

    target_path(checkpoint_dir)  # trains the target there if it is missing
    with tempfile.TemporaryDirectory(prefix="unlearnable-service-") as folder:
        server = start_service(checkpoint_dir, Path(folder))
        try:
            service = Service(server.url, server.admin_token)
            test = as_dataset("test", data["test_images"], data["test_labels"])
            key = service.open_account("benchmark-measurer")
            target_labels = hosted_labels(service, key, TARGET, test)
            score = float((target_labels == test.labels.numpy()).mean())
            print(f"service at {server.url}: {TARGET} scores {score:.2%} on the test split")
            yield {"service": asdict(service), "target_test_labels": target_labels.tolist()}
        finally:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Unlearnable examples (issue 12, rows 2 to 7; see the module docstring)."
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--eps", nargs="+", default=["8/255", "16/255", "32/255", "64/255"])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), help="row 2; add resnet18")
    parser.add_argument("--rows", nargs="+", type=int, default=list(ROWS), choices=ROWS)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--size", type=int, default=10_000,
        help="protected images: a balanced subset of full MNIST, or of the embedded pool (1,500)",
    )  # fmt: skip
    parser.add_argument(
        "--uc-surrogate", default="digits-embedded:pool",
        help="dataset spec the UC surrogate is trained on (another source than the images)",
    )  # fmt: skip
    parser.add_argument(
        "--recipes", nargs="+", default=list(RECIPE_NAMES), choices=RECIPE_NAMES,
        help="row 3: training-jobs API recipes",
    )  # fmt: skip
    parser.add_argument(
        "--steal-ks", nargs="+", type=int, default=None,
        help=f"row 6: labels bought per substitute (default {' '.join(map(str, STEAL_KS))}, "
        "capped at the pool's size; a k given here above it is an error)",
    )  # fmt: skip
    parser.add_argument(
        "--steal-epochs", type=int, default=30, help="row 6: substitute epochs (batch 4)"
    )
    parser.add_argument(
        "--transfer-seeds", type=int, default=100,
        help="row 6: test images PGD starts from (9 targeted examples each, each sent over HTTP)",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=ROOT / "checkpoints",
        help=f"rows 3 and 6: where the service finds {TARGET}.pt (trained there if missing)",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help="a smoke run: embedded split, 32/255, 2 seeds, rows 2 and 7, linear and LeNet-5 "
        "(options given explicitly win)",
    )  # fmt: skip
    parser.add_argument(
        "--variant", action="append", default=[], metavar="LABEL=METHOD:JSON",
        help="a registered method with options, measured as a method of its own named LABEL "
        """(also a name for --methods), e.g. 'em-classwise-b14=em-classwise:{"block": 14}'""",
    )  # fmt: skip
    parser.add_argument(
        "--no-clean", action="store_true",
        help="skip the clean baseline (when another run with the same settings measured it)",
    )  # fmt: skip
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=1, help="jobs run in parallel processes")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "unlearnable.json")
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(
            seeds=2, eps=["32/255"], rows=[2, 7], archs=["linear", "lenet5"],
            output=ROOT / "results" / "unlearnable_quick.json",
        )  # fmt: skip
        args = parser.parse_args()
        args.data_root = None
    try:
        variants = dict(map(parse_variant, args.variant))
    except ValueError as exc:
        parser.error(str(exc))
    methods = args.methods or [*METHODS, *variants]
    unknown = sorted(set(methods) - set(METHODS) - set(variants))
    if unknown:
        parser.error(f"unknown --methods {unknown}; known: {sorted([*METHODS, *variants])}")
    for text in args.eps:
        try:
            parse_eps(text)
        except (ValueError, ZeroDivisionError):
            parser.error(f"--eps must be numbers like 32/255 or 0.125, got {text!r}")
    started = time.perf_counter()
    data, source = load_data(args.data_root, args.size)
    pool_size = len(data["labels"])
    if args.steal_ks is None:
        args.steal_ks, capped = cap_ks(list(STEAL_KS), pool_size)
        if capped and 6 in args.rows:
            print(capped)
    else:
        try:
            args.steal_ks = check_ks(args.steal_ks, pool_size)
        except ValueError as exc:
            parser.error(str(exc))
    options = {"uc": {"surrogate": args.uc_surrogate, "data_root": args.data_root}}
    common = {"epochs": args.epochs, "rows": args.rows, "archs": args.archs, "options": options,
              "variants": variants,
              "all_eps": args.eps, "data_root": args.data_root, "size": args.size,
              "recipes": args.recipes, "steal_ks": args.steal_ks,
              "steal_epochs": args.steal_epochs, "transfer_seeds": args.transfer_seeds}  # fmt: skip
    baseline_seeds = [] if args.no_clean else range(args.seeds)
    jobs = [{"method": "clean", "eps": "-", "seed": seed, **common} for seed in baseline_seeds]
    jobs += [
        {"method": method, "eps": eps, "seed": seed, **common}
        for seed in range(args.seeds)
        for eps in args.eps
        for method in methods
    ]

    # Rows go to a JSON-lines file as each job finishes: a re-run with the same output skips
    # the jobs already there (as benchmarks/extraction_vs_queries.py does).
    progress_path = args.output.with_suffix(".rows.jsonl")
    rows = read_rows(progress_path)
    done = {(r["method"], r["eps"], r["seed"], r["epochs"], r["row"]) for r in rows}

    def finished(job: dict[str, Any]) -> bool:
        return all(
            (job["method"], job["eps"], job["seed"], job["epochs"], row) in done
            for row in job["rows"]
        )

    todo = [job for job in jobs if not finished(job)]
    print(f"data: {source}; {len(jobs) - len(todo)} jobs done before, {len(todo)} to go")
    with contextlib.ExitStack() as stack:
        if todo and {3, 6} & set(args.rows):
            service = stack.enter_context(serving(args.checkpoint_dir, data))
            for job in todo:
                job.update(service)
        finished_rows = run_jobs(run_job, todo, workers=args.workers, rows_path=progress_path)
        for i, job_rows in enumerate(finished_rows, 1):
            print(f"[{i}/{len(todo)} jobs done]", flush=True)
            rows += job_rows
    wanted = {(j["method"], j["eps"], j["seed"], j["epochs"], r) for j in jobs for r in j["rows"]}
    rows = [r for r in rows if (r["method"], r["eps"], r["seed"], r["epochs"], r["row"]) in wanted]
    rows = [r for r in rows if r["row"] != 2 or r["variant"] in args.archs]
    rows = [r for r in rows if r["row"] != 3 or r["variant"] in args.recipes]
    rows = [r for r in rows if r["row"] != 6 or r["k"] in args.steal_ks]
    summary = summarise(rows)
    report = {
        "benchmark": "unlearnable",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "data": source,
        "settings": {"seeds": args.seeds, "eps": args.eps, "methods": methods, "archs": args.archs,
                     "variants": variants,
                     "rows": args.rows, "epochs": args.epochs, "uc_surrogate": args.uc_surrogate,
                     "recipes": args.recipes, "steal_ks": args.steal_ks,
                     "steal_epochs": args.steal_epochs, "transfer_seeds": args.transfer_seeds},
        "summary": summary,
        "first_eps_under_50": first_eps_below(summary, 0.5),
        "first_eps_under_20": first_eps_below(summary, 0.2),
        "rows": rows,
        "paper": PAPER,
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    markdown = to_markdown(summary, source)
    args.output.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {args.output} in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
