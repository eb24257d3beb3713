"""Membership challenges: the service holds the ground truth, the attacker submits scores.

The admin opens a challenge on a hosted model for one client. Its ``n`` candidates are balanced:
``n / 2`` members drawn from the model's training set and ``n / 2`` non-members drawn from the
``test`` split of the same dataset (held-out data of the same distribution; every registry
dataset's ``test`` split is disjoint from its attacker ``pool``), in a seeded random order. The
model's members are what its checkpoint says: ``provenance["members"] = {"dataset":
"name:split", "indices": [...]}`` when it was trained on a subset or a condensed set (the real
images the condensation consumed), else the whole ``checkpoint.dataset`` split.

The candidates are stored as ``[is_member, index]`` pairs and served as images and class labels
only; a submission is scored once (``mlcore.membership_metrics``) and the result kept.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlcore.checkpoints import CheckpointError, load_checkpoint
from mlcore.datasets import DATASETS, DatasetError, ImageDataset, load_dataset, parse_spec
from mlcore.membership_metrics import check_scores, membership_metrics, roc_points
from mlcore.wire import echo
from target_service.errors import InvalidInput, NotFound
from target_service.service import TargetService
from target_service.state import already_submitted
from target_service.zoo import checkpoint_path, user_model_path

NON_MEMBER_SPLIT = "test"


@dataclass(frozen=True)
class MemberSource:
    """Where a model's members and the challenge's non-members come from."""

    members_from: str  # "name:split"
    member_indices: np.ndarray  # into that split
    non_members_from: str


def member_source(service: TargetService, model: str, client_id: str) -> MemberSource:
    """The members of ``model`` (as ``client_id`` may see it) from its checkpoint, or
    InvalidInput naming why it has none the service can serve."""
    hosted = service.model(model, client_id)  # NotFound if the client may not use it
    if model in service.models:
        path = checkpoint_path(service.settings.checkpoint_dir, model)
    else:
        job = service.store.hosted_job(model)
        if job is None:  # unreachable after service.model, kept for the type checker
            raise NotFound(f"no model named {echo(model)}", code="unknown_model")
        path = user_model_path(service.settings.state_dir, job["job_id"])
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as exc:
        raise InvalidInput(f"the checkpoint of {hosted.name} cannot be read: {exc}") from None
    recorded = checkpoint.provenance.get("members")
    spec = recorded["dataset"] if isinstance(recorded, dict) else checkpoint.dataset
    try:
        name, _split = parse_spec(str(spec))
        split_size = len(load_dataset(spec, data_root=service.settings.data_root))
    except DatasetError as exc:
        raise InvalidInput(
            f"model {hosted.name} was trained on {echo(spec)}, not a registry dataset the "
            f"service can draw members and held-out non-members from: {exc}",
            code="no_members",
        ) from None
    if isinstance(recorded, dict):
        indices = np.asarray(recorded.get("indices", []), dtype=np.int64)
        if (
            indices.ndim != 1
            or indices.size == 0
            or indices.min() < 0
            or indices.max() >= split_size
        ):
            raise InvalidInput(
                f"model {hosted.name}'s recorded members are not indices into {spec}",
                code="no_members",
            )
    else:
        indices = np.arange(split_size)
    if NON_MEMBER_SPLIT not in DATASETS[name].splits:
        raise InvalidInput(
            f"dataset {name} has no {NON_MEMBER_SPLIT!r} split to draw non-members from",
            code="no_members",
        )
    return MemberSource(spec, np.unique(indices), f"{name}:{NON_MEMBER_SPLIT}")


def open_challenge(
    service: TargetService, *, model: str, client_id: str, n: int, seed: int
) -> dict[str, Any]:
    """Draw the balanced candidates and store the challenge; returns its stored row."""
    service.store.get_client(client_id)  # 404 for an unknown client
    if n % 2:
        raise InvalidInput(f"n must be even (half members, half non-members), got {n}")
    source = member_source(service, model, client_id)
    non_member_indices = np.arange(len(_dataset(service, source.non_members_from)))
    if source.non_members_from == source.members_from:  # never draw a member as a non-member
        non_member_indices = np.setdiff1d(non_member_indices, source.member_indices)
    half = n // 2
    for what, available in (
        (f"members in {source.members_from}", len(source.member_indices)),
        (f"non-members in {source.non_members_from}", len(non_member_indices)),
    ):
        if half > available:
            raise InvalidInput(
                f"n = {n} needs {half} {what}, but model {model} has only {available}: "
                f"n must be at most {2 * available}"
            )
    rng = np.random.default_rng(seed)
    members = rng.choice(source.member_indices, half, replace=False)
    non_members = rng.choice(non_member_indices, half, replace=False)
    candidates = [[1, int(i)] for i in members] + [[0, int(i)] for i in non_members]
    order = rng.permutation(n)
    row: dict[str, Any] = {
        "challenge_id": uuid.uuid4().hex[:16],
        "client_id": client_id,
        "model": model,
        "n": n,
        "seed": seed,
        "members_from": source.members_from,
        "non_members_from": source.non_members_from,
        "candidates": [candidates[i] for i in order],
        "created_at": time.time(),
    }
    service.store.add_membership_challenge(row)
    return service.store.get_membership_challenge(row["challenge_id"])


def candidate_images(
    service: TargetService, challenge: dict[str, Any]
) -> tuple[np.ndarray, list[int]]:
    """The candidates as uint8 images (n, C, H, W) and class labels, in the challenge's order."""
    sources = {
        1: _dataset(service, challenge["members_from"]),
        0: _dataset(service, challenge["non_members_from"]),
    }
    images = np.stack([sources[m].images[i].numpy() for m, i in challenge["candidates"]])
    labels = [int(sources[m].labels[i]) for m, i in challenge["candidates"]]
    return images, labels


def score_challenge(
    service: TargetService, challenge: dict[str, Any], scores: list[float]
) -> dict[str, Any]:
    """Score a submission against the ground truth and keep the result (409 on a second)."""
    if challenge["result"] is not None:
        raise already_submitted(challenge["challenge_id"])
    try:
        values = check_scores(scores, challenge["n"])
    except ValueError as exc:
        raise InvalidInput(str(exc), code="invalid_scores") from None
    truth = np.array([member for member, _ in challenge["candidates"]], dtype=bool)
    result = {**membership_metrics(truth, values), "roc": roc_points(truth, values)}
    service.store.record_membership_result(challenge["challenge_id"], result)
    return result


def _dataset(service: TargetService, spec: str) -> ImageDataset:
    return load_dataset(spec, data_root=service.settings.data_root)
