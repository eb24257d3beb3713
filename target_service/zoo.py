"""The hosted models: what each target is, how it is trained, and loading it from a checkpoint.

A missing checkpoint is trained on first start (and logged), so a fresh clone serves real
models without any download.

Beside each checkpoint ``<name>.pt`` live the MI detector's benign reference
(``<name>.mi_reference.json``) and the detectors' calibration (``<name>.calibration.json``,
``defenses.calibration``): thresholds that flag at most 1% of simulated benign clients within
1,000 queries. A checkpoint trained at first start or by ``target-service train`` is
calibrated then; ``target-service calibrate`` (re)calibrates. The service applies a calibrated
threshold unless ``TARGET_DETECTORS`` sets that threshold explicitly; without a calibration
made for this very checkpoint and these detector settings, a detector keeps its fixed default
(logged as a warning).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defenses.calibration import (
    DEFAULT_HORIZON,
    DEFAULT_SHARE,
    QUICK_CLIENTS,
    Calibration,
    calibrate,
    recordable_settings,
)
from defenses.condensation import CondensationConfig
from defenses.mi_redundancy import MiReference, calibrate_mi_reference
from defenses.output_policies import OutputPolicy, parse_policy
from mlcore.architectures import arch_kwargs_for, build_model
from mlcore.checkpoints import load_checkpoint, save_checkpoint
from mlcore.datasets import DATASETS, load_dataset
from mlcore.training import accuracy, fit, predict_labels, predict_logits, seed_everything
from target_service.detection import AlarmPolicy, DefenceConfig
from target_service.member_sets import parse_derived, scaled_epochs, training_set

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetSpec:
    """How a hosted target is built: architecture, data and training schedule."""

    name: str
    arch: str
    train_data: str
    test_data: str
    epochs: int
    batch_size: int = 32
    seed: int = 0
    # train on a condensed version of train_data, or on a random subset of it (member_sets.py)
    condensation: CondensationConfig | None = None
    member_count: int | None = None

    @property
    def dataset(self) -> str:
        return self.train_data.partition(":")[0]


TARGETS: dict[str, TargetSpec] = {
    spec.name: spec
    for spec in [
        TargetSpec(
            "lenet5-mnist", "lenet5", "mnist-embedded:target-train", "mnist-embedded:test", 15
        ),
        TargetSpec("c3f2-mnist", "c3f2", "mnist-embedded:target-train", "mnist-embedded:test", 10),
        TargetSpec("dnn5-mnist", "dnn5", "mnist-embedded:target-train", "mnist-embedded:test", 30),
        TargetSpec("resnet18-cifar10", "resnet18", "cifar10:target-train", "cifar10:test", 30, 64),
        TargetSpec(
            "convnet-mnist", "convnet", "mnist-embedded:target-train", "mnist-embedded:test", 10
        ),
    ]
}


def target_spec(name: str) -> TargetSpec:
    """A target by name: one of TARGETS, or one derived from it (``member_sets.py``), e.g.
    ``lenet5-mnist-dm10-noise`` or ``lenet5-mnist-subset100``."""
    if name in TARGETS:
        return TARGETS[name]
    derivation = parse_derived(name)
    if derivation is None or derivation.base not in TARGETS:
        raise ValueError(
            f"model must be one of {sorted(TARGETS)} or one of them trained on a condensed set "
            f"or subset (<model>-dm10-noise, <model>-dc1-real, <model>-subset100), got {name!r}"
        )
    return replace(
        TARGETS[derivation.base],
        name=name,
        condensation=derivation.condensation,
        member_count=derivation.member_count,
    )


# Thresholds come from the calibration beside the checkpoint (else each detector's default).
DEFAULT_DETECTORS: dict[str, dict[str, Any]] = {"prada": {}, "mi_redundancy": {}}


@dataclass
class HostedModel:
    name: str
    dataset: str
    model: nn.Module
    input_shape: tuple[int, int, int]
    num_classes: int
    policy: OutputPolicy
    metrics: dict
    defence: DefenceConfig = field(default_factory=DefenceConfig)
    owner: str | None = None  # client_id of a client's trained model; None for the operator's
    public: bool = True

    def visible_to(self, client_id: str | None) -> bool:
        return self.public or (client_id is not None and client_id == self.owner)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return predict_logits(self.model, images)


def checkpoint_path(checkpoint_dir: Path, name: str) -> Path:
    return checkpoint_dir / f"{name}.pt"


def train_target(
    spec: TargetSpec,
    checkpoint_dir: Path,
    *,
    data_root: Path | None = None,
    epochs: int | None = None,
) -> Path:
    """Train one target from scratch, evaluate it on its test split and save the checkpoint."""
    train = load_dataset(spec.train_data, data_root=data_root)
    test = load_dataset(spec.test_data, data_root=data_root)
    used = training_set(
        train, condensation=spec.condensation, member_count=spec.member_count, seed=spec.seed
    )
    arch_kwargs = arch_kwargs_for(spec.arch, train.input_shape, train.num_classes)
    seed_everything(spec.seed)
    model = build_model(spec.arch, **arch_kwargs)
    epochs = scaled_epochs(epochs or spec.epochs, len(train), len(used.labels))
    started = time.perf_counter()
    fit(model, used.images, used.labels, epochs=epochs, batch_size=spec.batch_size, seed=spec.seed)
    metrics = {
        "test_accuracy": accuracy(model, test.images, test.labels),
        "test_data": spec.test_data,
        "train_size": len(used.labels),
        "epochs": epochs,
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    logger.info("trained %s: test accuracy %.4f", spec.name, metrics["test_accuracy"])
    path = save_checkpoint(
        checkpoint_path(checkpoint_dir, spec.name),
        model,
        arch=spec.arch,
        arch_kwargs=arch_kwargs,
        dataset=spec.train_data,
        metrics=metrics,
        provenance=used.provenance,
    )
    mi_reference(spec, checkpoint_dir, data_root)
    return path


def load_hosted(
    name: str,
    checkpoint_dir: Path,
    *,
    policy: str = "label-only",
    train_missing: bool = True,
    data_root: Path | None = None,
    epochs: int | None = None,
    detectors: dict[str, dict[str, Any]] | None = None,
    alarm_policy: AlarmPolicy = "log",
    calibration_clients: int = QUICK_CLIENTS,
) -> HostedModel:
    """Load a hosted model; train (and, with ``calibration_clients`` > 0, calibrate) it first
    when its checkpoint is missing and ``train_missing``."""
    spec = target_spec(name)
    path = checkpoint_path(checkpoint_dir, name)
    if not path.exists():
        if not train_missing:
            raise FileNotFoundError(
                f"no checkpoint for {name} at {path} (run `target-service train`)"
            )
        logger.warning("no checkpoint for %s at %s: training it now (first start)", name, path)
        train_target(spec, checkpoint_dir, data_root=data_root, epochs=epochs)
        if calibration_clients > 0:
            calibrate_target(
                spec, checkpoint_dir, detectors, data_root=data_root, clients=calibration_clients
            )
    checkpoint = load_checkpoint(path)
    info = DATASETS[spec.dataset]
    configured = _with_references(
        spec,
        detectors if detectors is not None else DEFAULT_DETECTORS,
        checkpoint_dir,
        data_root,
    )
    return HostedModel(
        name=name,
        dataset=spec.dataset,
        model=checkpoint.model,
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        policy=parse_policy(policy),
        metrics=checkpoint.metrics,
        defence=DefenceConfig(
            _with_calibration(configured, calibration_path(checkpoint_dir, name), path, name),
            alarm_policy,
        ),
    )


def mi_reference_path(checkpoint_dir: Path, name: str) -> Path:
    return checkpoint_dir / f"{name}.mi_reference.json"


def mi_reference(
    spec: TargetSpec, checkpoint_dir: Path, data_root: Path | None = None
) -> MiReference:
    """The MI detector's benign reference for a target, stored beside its checkpoint: measured
    once on the target's own training data (benign, and disjoint from the attacker's pool)."""
    path = mi_reference_path(checkpoint_dir, spec.name)
    if path.exists():
        return MiReference.load(path)
    logger.info("calibrating the MI-redundancy reference of %s on %s", spec.name, spec.train_data)
    reference = calibrate_mi_reference(load_dataset(spec.train_data, data_root=data_root).images)
    reference.save(path)
    return reference


def _with_references(
    spec: TargetSpec,
    detectors: dict[str, dict[str, Any]],
    checkpoint_dir: Path,
    data_root: Path | None,
) -> dict[str, dict[str, Any]]:
    if "mi_redundancy" not in detectors or "reference" in detectors["mi_redundancy"]:
        return detectors
    reference = mi_reference(spec, checkpoint_dir, data_root)
    return {**detectors, "mi_redundancy": {**detectors["mi_redundancy"], "reference": reference}}


def calibration_path(checkpoint_dir: Path, name: str) -> Path:
    return checkpoint_dir / f"{name}.calibration.json"


def calibrate_target(
    spec: TargetSpec,
    checkpoint_dir: Path,
    detectors: dict[str, dict[str, Any]] | None = None,
    *,
    data_root: Path | None = None,
    share: float = DEFAULT_SHARE,
    horizon: int = DEFAULT_HORIZON,
    clients: int = QUICK_CLIENTS,
    seed: int = 0,
    progress: Callable[[str, int], None] | None = None,
) -> Calibration:
    """Calibrate a target's detectors (default: ``DEFAULT_DETECTORS``) on benign clients drawing
    from its own training data (benign, disjoint from the attacker's pool), labelled by the
    target itself; store the calibration beside the checkpoint."""
    path = checkpoint_path(checkpoint_dir, spec.name)
    if not path.exists():
        raise FileNotFoundError(
            f"no checkpoint for {spec.name} at {path} (run `target-service train`)"
        )
    configured = _with_references(
        spec, DEFAULT_DETECTORS if detectors is None else detectors, checkpoint_dir, data_root
    )
    logger.info(
        "calibrating the detectors %s of %s: %d benign clients per population, %d queries "
        "each, at most %g%% flagged",
        sorted(configured), spec.name, clients, horizon, 100 * share,
    )  # fmt: skip
    calibration = calibrate_checkpoint(
        path,
        configured,
        load_dataset(spec.train_data, data_root=data_root).images,
        source={"model": spec.name, "images": spec.train_data},
        share=share,
        horizon=horizon,
        clients=clients,
        seed=seed,
        progress=progress,
    )
    calibration.save(calibration_path(checkpoint_dir, spec.name))
    logger.info("calibrated %s: %s", spec.name, calibration.settings())
    return calibration


def calibrate_checkpoint(
    checkpoint: Path,
    detectors: dict[str, dict[str, Any]],
    images: torch.Tensor,
    *,
    source: dict[str, Any],
    share: float = DEFAULT_SHARE,
    horizon: int = DEFAULT_HORIZON,
    clients: int = QUICK_CLIENTS,
    seed: int = 0,
    progress: Callable[[str, int], None] | None = None,
) -> Calibration:
    """Calibrate ``detectors`` for the model saved in ``checkpoint`` on benign clients drawing
    from ``images``, labelled by that model; ``source`` (where the images came from) gains the
    checkpoint's sha256, the calibration is applied to that checkpoint only. Not saved."""
    model = load_checkpoint(checkpoint).model
    started = time.perf_counter()
    calibration = calibrate(
        detectors,
        images,
        torch.inference_mode()(lambda x: predict_labels(model, x)),
        share=share,
        horizon=horizon,
        clients=clients,
        seed=seed,
        progress=progress,
    )
    return replace(
        calibration,
        source={
            **source,
            "checkpoint_sha256": _sha256(checkpoint),
            "seconds": round(time.perf_counter() - started, 1),
        },
    )


def _with_calibration(
    detectors: dict[str, dict[str, Any]], path: Path, checkpoint: Path, model: str
) -> dict[str, dict[str, Any]]:
    """The detector settings with calibrated thresholds (from the calibration at ``path``)
    added where none is set explicitly and the calibration was made for this ``checkpoint``
    and these settings; ``model`` names it in warnings."""
    if not detectors:
        return detectors
    if not path.exists():
        logger.warning(
            "%s has no detector calibration (%s): detectors keep their fixed default "
            "thresholds; (re)calibrate it (`target-service calibrate` for an operator model)",
            model, path,
        )  # fmt: skip
        return detectors
    calibration = Calibration.load(path)
    if calibration.source.get("checkpoint_sha256") != _sha256(checkpoint):
        logger.warning(
            "%s was made for another checkpoint of %s and is ignored; (re)calibrate it",
            path, model,
        )  # fmt: skip
        return detectors
    out = {}
    for name, settings in detectors.items():
        entry = calibration.detectors.get(name)
        if entry is None or entry["setting"] in settings:
            out[name] = settings  # not calibrated, or set explicitly (which wins)
        elif entry["settings"] != recordable_settings(settings):
            logger.warning(
                "%s calibrated %s with settings %s, not %s: not applied; (re)calibrate it",
                path, name, entry["settings"], recordable_settings(settings),
            )  # fmt: skip
            out[name] = settings
        else:
            out[name] = {**settings, entry["setting"]: calibration.threshold(name)}
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- models clients trained (training jobs) -----------------------------------------------------
def user_model_path(state_dir: Path, job_id: str) -> Path:
    return state_dir / "models" / f"{job_id}.pt"


def user_mi_reference_path(state_dir: Path, job_id: str) -> Path:
    return state_dir / "models" / f"{job_id}.mi_reference.json"


def user_calibration_path(state_dir: Path, job_id: str) -> Path:
    return state_dir / "models" / f"{job_id}.calibration.json"


def model_card(hosted: HostedModel) -> dict[str, Any]:
    """What ``GET /v1/models`` says about a hosted model."""
    return {
        "name": hosted.name,
        "dataset": hosted.dataset,
        "input_shape": list(hosted.input_shape),
        "num_classes": hosted.num_classes,
        "output_policy": hosted.policy.name,
    }


def user_model_card(job: dict[str, Any]) -> dict[str, Any]:
    """``model_card`` of a succeeded job's model, from the job alone (nothing loaded)."""
    spec = job["spec"]
    return {
        "name": job["model"],
        "dataset": f"upload:{spec['dataset_name']}",
        "input_shape": list(spec["input_shape"]),
        "num_classes": spec["classes"],
        "output_policy": parse_policy(spec["request"].get("output_policy", "label-only")).name,
    }


def load_user_model(job: dict[str, Any], state_dir: Path) -> HostedModel:
    """The model a succeeded training job produced, with the policy and detectors its owner
    chose; the MI detector uses the reference, and the detectors the calibration, the worker
    measured on the owner's data."""
    request = job["spec"]["request"]
    card = user_model_card(job)
    path = user_model_path(state_dir, job["job_id"])
    checkpoint = load_checkpoint(path)
    detectors = dict(
        DEFAULT_DETECTORS if request.get("detectors") is None else request["detectors"]
    )
    if "mi_redundancy" in detectors:
        reference = user_mi_reference_path(state_dir, job["job_id"])
        if reference.exists():
            detectors["mi_redundancy"] = {**detectors["mi_redundancy"], "reference": reference}
        else:  # too few training images to measure one (the job's metrics say so)
            del detectors["mi_redundancy"]
    channels, height, width = card["input_shape"]
    return HostedModel(
        name=card["name"],
        dataset=card["dataset"],
        model=checkpoint.model,
        input_shape=(channels, height, width),
        num_classes=card["num_classes"],
        policy=parse_policy(card["output_policy"]),
        metrics=checkpoint.metrics,
        defence=DefenceConfig(
            _with_calibration(
                detectors, user_calibration_path(state_dir, job["job_id"]), path, card["name"]
            ),
            request.get("alarm_policy", "log"),
        ),
        owner=job["client_id"],
        public=job["publish"] == "public",
    )
