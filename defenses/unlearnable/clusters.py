"""Unlearnable Clusters (Zhang et al., CVPR 2023): label-agnostic, cluster-wise noise.

The owner has no labels (or does not trust the trainer to use them), so the noise cannot be tied
to classes. Instead: embed the images with a surrogate that never saw them, split the embeddings
into ``p`` clusters with K-means, and give every cluster one noise pattern. Each pattern is
optimised so that the cluster's perturbed features all point at the centre of another cluster
(cluster c -> cluster (c + offset) mod p): the cluster is first *aggregated* (all its images end up
at one point) and then *spun* (that point is someone else's centre). A model trained on the result
finds a shortcut, the cluster-wise pattern, that has nothing to do with the classes.

As in the paper's loss, each pattern maximises the cosine similarity of its cluster's features
to the target centre. The authors' code trains a generator per cluster to output the pattern; here
the pattern is optimised directly with signed-gradient steps (PGD), which is what the generator
stands in for when the images are 28x28.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn

from defenses.unlearnable.base import (
    Progress,
    ProtectionResult,
    UnlearnableError,
    check_eps,
    check_images,
    check_labels,
    load_state,
    project,
    run_fingerprint,
    save_state,
)
from defenses.unlearnable.options import check_option_names
from defenses.unlearnable.surrogate import (
    DEFAULT_SOURCE,
    check_surrogate_fits,
    feature_extractor,
    penultimate_features,
    train_surrogate,
)
from mlcore.checkpoints import load_checkpoint
from mlcore.training import accuracy

logger = logging.getLogger(__name__)


def unlearnable_clusters(
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    eps: float,
    seed: int,
    progress: Progress | None = None,
    resume_path: Path | None = None,
    **options: Any,
) -> ProtectionResult:
    """Unlearnable Clusters: one noise pattern per K-means cluster of a surrogate's features
    (label-agnostic; options: the keywords of ``protect_clusters``)."""
    check_option_names("uc", protect_clusters, options)
    return protect_clusters(
        images, labels, eps=eps, seed=seed, progress=progress, resume_path=resume_path, **options
    )


def protect_clusters(
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    eps: float,
    seed: int,
    progress: Progress | None = None,
    resume_path: Path | None = None,
    clusters: int = 10,
    surrogate: str | nn.Module = DEFAULT_SOURCE,
    surrogate_arch: str = "lenet5",
    surrogate_epochs: int = 20,
    data_root: str | None = None,
    steps: int = 100,
    step_size: float | None = None,
    target_offset: int = 1,
) -> ProtectionResult:
    """Protect float ``images`` in [0, 1] with one noise pattern per K-means cluster.

    ``surrogate`` is the feature extractor's     model: a dataset spec to train one on (another source than ``images``), a checkpoint file,
    or a trained model. ``labels`` are not used, only passed through. Every image of a cluster
    gets the cluster's pattern, cut only where the [0, 1] clip cuts it; ``info["clusters"]``
    gives each image's cluster."""
    eps = check_eps(eps)
    images = check_images(images)
    labels = check_labels(labels, len(images))
    if isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 2:
        raise UnlearnableError(f"clusters (p) must be an integer >= 2, got {clusters!r}")
    if clusters > len(images):
        raise UnlearnableError(
            f"clusters (p) must be at most the {len(images)} images, got {clusters}"
        )
    if steps < 1:
        raise UnlearnableError(f"steps must be >= 1, got {steps}")
    if not 1 <= target_offset < clusters:
        raise UnlearnableError(f"target_offset must be in 1..{clusters - 1}, got {target_offset}")
    step_size = eps / 10 if step_size is None else step_size

    model, surrogate_info = _surrogate(
        surrogate,
        images,
        arch=surrogate_arch,
        epochs=surrogate_epochs,
        seed=seed,
        data_root=data_root,
    )
    if labels is not None and model is not None:
        surrogate_info["accuracy_on_images"] = accuracy(model, images, labels)
    features = penultimate_features(model, images).numpy()
    kmeans = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(features)
    assignment = torch.from_numpy(kmeans.labels_.astype("int64"))
    centres = torch.from_numpy(kmeans.cluster_centers_).float()

    settings = {
        "clusters": clusters,
        "surrogate": surrogate if isinstance(surrogate, str) else surrogate_info,
        "surrogate_arch": surrogate_arch,
        "surrogate_epochs": surrogate_epochs,
        "steps": steps,
        "step_size": step_size,
        "target_offset": target_offset,
    }
    fingerprint = run_fingerprint("uc", images, None, eps=eps, seed=seed, options=settings)
    state = load_state(resume_path, fingerprint) or {"patterns": {}, "similarity": {}}
    patterns: dict[int, torch.Tensor] = state["patterns"]  # finished clusters
    final_similarity: dict[int, float] = state["similarity"]
    extractor = feature_extractor(model).eval()
    for param in extractor.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for cluster in range(clusters):
        start = (torch.rand(images.shape[1:], generator=generator) * 2 - 1) * eps
        if cluster in patterns:
            continue  # finished before a resume
        members = images[assignment == cluster]
        target = centres[(cluster + target_offset) % clusters]
        patterns[cluster], final_similarity[cluster] = _spin_pattern(
            extractor, members, target, start, eps=eps, steps=steps, step_size=step_size
        )
        if resume_path is not None:
            state = {"patterns": patterns, "similarity": final_similarity}
            save_state(resume_path, fingerprint, state)
        if progress is not None:
            cosine = final_similarity[cluster]
            progress(cluster + 1, clusters, f"cluster {cluster}: cosine to target {cosine:.3f}")
    # Each image gets its cluster's pattern, cut where the [0, 1] clip cuts it (base.project).
    noise = project(images, torch.stack([patterns[int(c)] for c in assignment]), eps)
    protected = images + noise
    info: dict[str, Any] = {
        "method": "uc",
        "eps": eps,
        "seed": seed,
        "p": clusters,
        "clusters": assignment.tolist(),
        "cluster_sizes": torch.bincount(assignment, minlength=clusters).tolist(),
        "target_offset": target_offset,
        "steps": steps,
        "step_size": step_size,
        "target_cosine": [round(final_similarity[c], 4) for c in range(clusters)],
        "surrogate": surrogate_info,
    }
    # labels may be None (label-agnostic): passed through as they came
    return ProtectionResult(images=protected, labels=labels, noise=noise, info=info)  # type: ignore[arg-type]


def _spin_pattern(
    extractor: nn.Module,
    members: torch.Tensor,
    target: torch.Tensor,
    start: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
) -> tuple[torch.Tensor, float]:
    """PGD on one shared pattern: maximise the mean cosine similarity between the members'
    perturbed features and ``target``; returns the pattern and the similarity it reached."""
    pattern = start.clone()
    targets = target.expand(len(members), -1)
    similarity = 0.0
    for _ in range(steps):
        pattern.requires_grad_(True)
        features = extractor((members + pattern).clamp(0.0, 1.0))
        loss = -F.cosine_similarity(features, targets, dim=1).mean()
        (grad,) = torch.autograd.grad(loss, pattern)
        similarity = -loss.item()
        pattern = (pattern.detach() - step_size * grad.sign()).clamp(-eps, eps)
    with torch.no_grad():
        features = extractor((members + pattern).clamp(0.0, 1.0))
        similarity = F.cosine_similarity(features, targets, dim=1).mean().item()
    return pattern, similarity


def _surrogate(
    surrogate: str | nn.Module,
    images: torch.Tensor,
    *,
    arch: str,
    epochs: int,
    seed: int,
    data_root: str | None,
) -> tuple[nn.Module, dict[str, Any]]:
    if isinstance(surrogate, nn.Module):
        check_surrogate_fits(surrogate, images)
        return surrogate.eval(), {"source": "given model", "arch": type(surrogate).__name__}
    if isinstance(surrogate, str) and Path(surrogate).is_file():
        checkpoint = load_checkpoint(surrogate)
        check_surrogate_fits(checkpoint.model, images)
        info = {"source": checkpoint.dataset, "arch": checkpoint.arch, "checkpoint": surrogate}
        return checkpoint.model.eval(), {**info, **checkpoint.metrics}
    if not isinstance(surrogate, str):
        raise UnlearnableError(f"surrogate must be a dataset spec or a model, got {surrogate!r}")
    return train_surrogate(
        surrogate,
        input_shape=tuple(images.shape[1:]),
        arch=arch,
        epochs=epochs,
        seed=seed,
        data_root=data_root,
    )
