"""Rows 3 and 6 of ``benchmarks/unlearnable.py``: the protected images meet the range's service.

- Row 3 (UC Table 2 analog): a customer uploads the protected set through ``mlcore.client``,
  trains a LeNet-5 on it with each named recipe of the training-jobs API, follows the job, and
  the hosted model is scored by predicting the clean test split over HTTP.
- Row 6: the model-stealing attacker's pool is the protected set (read as ``npz:PATH``, as the
  attacker reads any pool); it selects k images (random, DRMI), buys the hosted target's labels
  for them over HTTP (``HttpOracle``) and trains a LeNet-5 substitute (``attacker.extraction``);
  we report its clean test accuracy, its agreement with the target, the transferability of
  targeted PGD examples crafted on it (``transferability_all``, the DRMI paper's definition, as
  ``benchmarks/transferability.py`` reports it) and DRMI's mutual information (the mean pairwise
  MI within each class, of the pool and of the selected set).

Every step goes through the attacker's and the customer's own code paths; this module only
strings them together and writes the rows. The service is a ``LiveServer`` started by the
benchmark's main process; jobs in worker processes reach it by URL and open their own accounts.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacker.extraction import evaluate_substitute, extract
from attacker.oracle import HttpOracle
from attacker.selection import make_selector
from attacker.transfer import transfer_attack
from attacker.transfer.attacks import make_attack
from mlcore.client import ServiceClient
from mlcore.datasets import ImageDataset, load_dataset
from mlcore.mutual_information import mutual_information_matrix
from target_service.testing import LiveServer, admin_create_client
from target_service.training_jobs import RECIPES

TARGET = "lenet5-mnist"  # the hosted target the attacker steals from (row 6)
RECIPE_NAMES = ("fastest", "standard")
STEAL_KS = (100, 300, 600, 1000, 1500)
# DRMI as benchmarks/transferability.py and the paper run it; random selection is seeded per run.
SELECTIONS: dict[str, dict[str, Any]] = {"random": {}, "drmi": {"alpha": 2.0, "init": "min-sum"}}
# Targeted L-inf PGD at the eps the DRMI paper's text names for Table 8, 40 steps (its setting).
TRANSFER_EPS, TRANSFER_STEPS = "128/255", 40
BUDGET = 10**9  # every account may buy whatever the run needs


@dataclass(frozen=True)
class Service:
    """Where the benchmark's service answers; picklable, so worker processes can reach it."""

    url: str
    admin_token: str

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def open_account(self, name: str) -> str:
        """A new client with an unlimited budget and training quota; returns its API key."""
        return admin_create_client(self, name, BUDGET, training_quota=BUDGET)[1]


def start_service(checkpoint_dir: Path, workdir: Path) -> LiveServer:
    """A ``target-service serve`` hosting the clean target, one training worker. Detection and
    detector calibration are off: neither changes a label or a trained weight, and calibrating
    each trained model takes minutes."""
    server = LiveServer(
        checkpoint_dir=checkpoint_dir,
        state_dir=workdir / "state",
        log_path=workdir / "service.log",
        models=(TARGET,),
        env={"training_workers": 1, "calibration_clients": 0, "detectors": {TARGET: {}}},
        startup_timeout=600,  # a loaded 2-core machine took 122 s to start it
    )
    return server.start()


def account_name(*parts: object) -> str:
    """A client or model name the service accepts, e.g. ('em-classwise', '32/255', 0) ->
    'em-classwise-32of255-0'."""
    return re.sub(r"[^A-Za-z0-9._-]", "", "-".join(str(p).replace("/", "of") for p in parts))


def as_dataset(
    name: str, images: torch.Tensor, labels: torch.Tensor, *, num_classes: int = 10
) -> ImageDataset:
    """Float images in [0, 1] as the uint8 dataset the wire and the attacker use (MNIST's 10
    classes by default: a small test subset may not hold every class)."""
    pixels = images.clamp(0, 1).mul(255).round().to(torch.uint8)
    return ImageDataset(name, pixels, labels.long(), num_classes)


def save_npz(path: Path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    """The upload format (float32 images in [0, 1], labels), as ``defender protect`` writes it."""
    np.savez(path, images=images.float().numpy(), labels=labels.numpy())
    return path


def hosted_labels(service: Service, api_key: str, model: str, test: ImageDataset) -> np.ndarray:
    """A hosted model's labels of the ``test`` images, bought over HTTP."""
    with HttpOracle(service.url, api_key, model) as oracle:
        return oracle.predict_labels(test.images.numpy())


def hosted_accuracy(service: Service, api_key: str, model: str, test: ImageDataset) -> float:
    """Clean test accuracy of a hosted model, its labels bought over HTTP."""
    return float((hosted_labels(service, api_key, model, test) == test.labels.numpy()).mean())


def training_api_rows(
    service: Service,
    api_key: str,
    npz_path: Path,
    test: ImageDataset,
    *,
    recipes: list[str],
    seed: int,
    name: str,
    poll: float = 0.5,
) -> list[dict[str, Any]]:
    """Row 3, as the customer ``api_key``: upload ``npz_path``, train LeNet-5 with each recipe
    (its settings, this run's seed: the named recipes fix seed 0), follow the job, score the
    hosted model on ``test``."""
    rows = []
    with ServiceClient(service.url, api_key) as customer:
        dataset_id = customer.upload_dataset(npz_path, name=name)["dataset_id"]
        for recipe in recipes:
            settings = {**RECIPES[recipe].model_dump(), "seed": seed}
            started = time.perf_counter()
            queued = customer.submit_job(
                dataset_id=dataset_id, arch="lenet5", recipe=settings, name=f"{name}-{recipe}",
                detectors={},
            )  # fmt: skip
            job = customer.wait_for_job(queued["job_id"], poll=poll)
            if job["status"] != "succeeded":
                raise RuntimeError(f"the {recipe} job for {name} ended {job['status']}: {job}")
            rows.append(
                {
                    "variant": recipe,
                    "value": hosted_accuracy(service, api_key, job["model"], test),
                    "model": job["model"],
                    "recipe_epochs": job["epochs"],
                    "train_images": job["metrics"]["train_size"],
                    "job_seconds": round(time.perf_counter() - started, 1),
                }
            )
    return rows


def check_ks(ks: list[int], pool_size: int) -> list[int]:
    """The budgets, each a number of queries the pool can pay for; a k above it is an error."""
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= pool_size:
            raise ValueError(f"--steal-ks: k must be in 1..{pool_size} (the pool's size), got {k}")
    return sorted(set(ks))


def cap_ks(ks: list[int], pool_size: int) -> tuple[list[int], str | None]:
    """The default budgets capped at the pool's size, and a message saying what was dropped."""
    kept = [k for k in ks if k <= pool_size]
    if len(kept) == len(ks):
        return kept, None
    if pool_size not in kept:
        kept.append(pool_size)
    dropped = [k for k in ks if k > pool_size]
    return kept, (
        f"the pool holds {pool_size} images: --steal-ks {dropped} capped at {pool_size} "
        f"(running k = {kept})"
    )


def class_mutual_information(pool: ImageDataset) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per class: its pool indices and their pairwise MI matrix (DRMI's Eq. 1, 256 bins)."""
    labels = pool.labels.numpy()
    matrices = {}
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        matrices[int(c)] = (members, mutual_information_matrix(pool.images[members].numpy()))
    return matrices


def mean_within_class_mi(
    matrices: dict[int, tuple[np.ndarray, np.ndarray]], chosen: np.ndarray | None = None
) -> float | None:
    """The mean pairwise MI (nats) within each class, averaged over classes, of the whole pool
    or of the ``chosen`` indices (classes with fewer than two chosen images are skipped; None
    when no class has two)."""
    means = []
    for members, matrix in matrices.values():
        keep = (
            np.arange(len(members)) if chosen is None else np.flatnonzero(np.isin(members, chosen))
        )
        if len(keep) < 2:
            continue
        block = matrix[np.ix_(keep, keep)]
        means.append(block.sum() / (len(keep) * (len(keep) - 1)))  # the diagonal is 0
    return float(np.mean(means)) if means else None


def stealing_rows(
    service: Service,
    api_key: str,
    npz_path: Path,
    test: ImageDataset,
    target_test_labels: np.ndarray,
    *,
    ks: list[int],
    selections: list[str],
    epochs: int,
    transfer_seeds: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Row 6 on the pool in ``npz_path``, as the attacker ``api_key``: for each selection and k,
    buy k labels from the hosted target, train a LeNet-5 substitute (batch 4, the DRMI paper's),
    evaluate it and its targeted PGD examples against the target (each example sent over HTTP,
    counted apart from the k labels). A selection that picks the very indices an earlier one
    picked (k = the whole pool) copies its row, marked ``same_as`` and paying nothing."""
    pool = load_dataset(f"npz:{npz_path}")
    ks = check_ks(ks, len(pool))
    matrices = class_mutual_information(pool)
    pool_mi = mean_within_class_mi(matrices)
    mi_cache: dict[tuple, np.ndarray] = {}  # DRMI's own MI matrices, once per class for all k
    rows = []
    done: dict[bytes, dict[str, Any]] = {}  # chosen indices -> the row they gave
    for selection in selections:
        for k in ks:
            if selection == "drmi":
                selector = make_selector(selection, **SELECTIONS[selection], mi_cache=mi_cache)
            else:
                selector = make_selector(selection, **SELECTIONS[selection], seed=seed)
            chosen = selector(pool.images.numpy(), pool.labels.numpy(), k=k).indices
            earlier = done.get(np.asarray(chosen, dtype=np.int64).tobytes())
            if earlier is not None:
                # the same indices in the same order (k = the whole pool): the seeded substitute
                # and its examples would be the very same, so they are not trained twice
                rows.append(
                    earlier
                    | {"variant": f"{selection} k={k}", "selection": selection,
                       "same_as": earlier["variant"], "queries_paid": 0, "transfer_queries": 0}
                )  # fmt: skip
                continue
            # one nonce per purchase: a batch equal to an earlier one is paid again, not replayed
            with HttpOracle(
                service.url, api_key, TARGET, request_nonce=f"{selection}-{k}"
            ) as oracle:
                stolen = extract(oracle, pool, chosen, epochs=epochs, batch_size=4, seed=seed)
                paid = oracle.meter.report()["queries_paid"]
                transfer = transfer_attack(
                    oracle,
                    stolen.substitute,
                    test,
                    attack=make_attack(
                        "pgd", targeted=True, eps=TRANSFER_EPS, steps=TRANSFER_STEPS, seed=seed
                    ),
                    targeted=True,
                    seeds=transfer_seeds,
                    seed=seed,
                    send_all=True,  # the paper's protocol, as benchmarks/transferability.py
                    noise_baseline=False,
                )
            quality = evaluate_substitute(stolen.substitute, test, target_labels=target_test_labels)
            summary = transfer.summary()
            rows.append(
                {
                    "variant": f"{selection} k={k}",
                    "value": quality["substitute_accuracy"],
                    "selection": selection,
                    "k": k,
                    "agreement": quality["agreement"],
                    "transferability_all": summary["transferability_all"],
                    "selected_mi": mean_within_class_mi(matrices, chosen),
                    "pool_mi": pool_mi,
                    "queries_paid": paid,
                    "stopped_by": stolen.stopped_by,
                    "transfer_queries": transfer.queries["queries_paid"],
                    "transfer_examples": summary["crafted"],
                }
            )
            done[np.asarray(chosen, dtype=np.int64).tobytes()] = rows[-1]
    return rows
