"""MI-UE (Zhu et al.): unlearnable noise that makes each class's features collapse together.

The paper's thesis: unlearnable examples work by lowering the mutual information between clean
and protected features, and the way to lower it is to shrink the conditional covariance of the
protected features within each class. MI-UE does so by maximising the intra-class cosine
similarity of a surrogate's penultimate features with a supervised-contrastive loss (temperature
0.1), in a bi-level loop with the surrogate's own training, as error-minimising noise does:

    repeat (a round):
        train the surrogate one epoch on the protected images (cross-entropy, mlcore's loop);
        for every batch, ``noise_steps`` signed-gradient steps on the sample-wise noise that
        lower the supervised-contrastive loss of the surrogate's features (L-inf <= eps);
    until the mean intra-class cosine similarity of the protected features reaches
    ``stop_separation`` (it minus the inter-class similarity: ReLU features start with a high
    cosine between any two images) or ``rounds`` rounds have run.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defenses.unlearnable.base import (
    Progress,
    ProtectionResult,
    UnlearnableError,
    check_eps,
    check_images,
    check_labels,
    clip_straight_through,
    coarse_shape,
    coarse_to_full,
    load_state,
    project,
    require_labels,
    run_fingerprint,
    save_state,
)
from defenses.unlearnable.options import check_option_names
from defenses.unlearnable.surrogate import feature_extractor, penultimate_features
from mlcore.architectures import arch_kwargs_for, build_model
from mlcore.training import seed_everything, train_epoch

logger = logging.getLogger(__name__)


def supervised_contrastive_loss(
    features: torch.Tensor, labels: torch.Tensor, *, temperature: float = 0.1
) -> torch.Tensor:
    """Khosla et al.'s supervised-contrastive loss on cosine similarities: each image's
    same-class images are its positives, every other image of the batch the denominator.
    Anchors without a positive in the batch are left out."""
    normed = F.normalize(features, dim=1)
    logits = normed @ normed.T / temperature
    self_mask = torch.eye(len(labels), dtype=torch.bool)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(dim=1)
    has_positive = counts > 0
    if not has_positive.any():
        return features.sum() * 0.0
    per_anchor = log_prob.masked_fill(~positives, 0.0).sum(dim=1)[has_positive]
    return -(per_anchor / counts[has_positive]).mean()


@torch.no_grad()
def class_separation(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> tuple[float, float]:
    """(intra, inter): the mean cosine similarity of the penultimate features of two different
    images of the same class, averaged over classes (what MI-UE maximises), and of two images of
    different classes. ReLU features are non-negative, so both are high; their gap says how far
    the classes have collapsed apart from each other."""
    features = F.normalize(penultimate_features(model, images), dim=1)
    gram = features @ features.T
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    different = labels[:, None] != labels[None, :]
    per_class = []
    for label in labels.unique():
        rows = labels == label
        if same[rows].any():
            per_class.append(gram[rows][same[rows]].mean().item())
    intra = float(sum(per_class) / len(per_class)) if per_class else 0.0
    inter = gram[different].mean().item() if different.any() else 0.0
    return intra, inter


def mi_ue(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    eps: float,
    seed: int,
    progress: Progress | None = None,
    resume_path: Path | None = None,
    **options: Any,
) -> ProtectionResult:
    """Sample-wise MI-UE noise for float ``images`` in [0, 1] with their ``labels`` (options:
    the keywords of ``craft_mi_ue``)."""
    check_option_names("mi-ue", craft_mi_ue, options)
    result, _model = craft_mi_ue(
        images, labels, eps=eps, seed=seed, progress=progress, resume_path=resume_path, **options
    )
    return result


def craft_mi_ue(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    eps: float,
    seed: int,
    progress: Progress | None = None,
    resume_path: Path | None = None,
    surrogate: str = "lenet5",
    rounds: int = 10,
    noise_steps: int = 10,
    step_size: float | None = None,
    temperature: float = 0.1,
    batch_size: int = 256,
    stop_separation: float = 0.9,
    block: int = 1,
) -> tuple[ProtectionResult, nn.Module]:
    """``mi_ue`` that also returns the surrogate model it trained (to measure what it did)."""
    eps = check_eps(eps)
    images = check_images(images)
    labels = require_labels(check_labels(labels, len(images)), "mi-ue")
    for name, value in (
        ("rounds", rounds),
        ("noise_steps", noise_steps),
        ("batch_size", batch_size),
    ):
        if value < 1:
            raise UnlearnableError(f"{name} must be >= 1, got {value}")
    if temperature <= 0:
        raise UnlearnableError(f"temperature must be > 0, got {temperature}")
    step_size = eps / 10 if step_size is None else step_size
    num_classes = int(labels.max()) + 1

    seed_everything(seed)
    model = build_model(
        surrogate,
        **arch_kwargs_for(surrogate, images.shape[1:], num_classes),  # type: ignore[arg-type]
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    # A uniform random start in the eps-ball (as sample-wise error-minimising noise starts).
    # With ``block`` > 1 the noise is a coarse grid, one value per block x block square
    # (``coarse_to_full``); at 1 it is the paper's pixel-wise noise, kept projected.
    shape = (len(images), *coarse_shape(images.shape[1:], block))
    random_start = (torch.rand(shape, generator=generator) * 2 - 1) * eps
    noise = project(images, random_start, eps) if block == 1 else random_start
    full = functools.partial(coarse_to_full, size=tuple(images.shape[2:]))

    def added(noise: torch.Tensor) -> torch.Tensor:
        """The noise as the images carry it (pixel-wise noise is kept so already)."""
        return noise if block == 1 else project(images, full(noise), eps)

    done, history = 0, []  # history: (intra, inter)-class cosine after each round
    settings = {
        "arch": surrogate,
        "rounds": rounds,
        "noise_steps": noise_steps,
        "step_size": step_size,
        "temperature": temperature,
        "batch_size": batch_size,
        "stop_separation": stop_separation,
        "block": block,
    }
    fingerprint = run_fingerprint("mi-ue", images, labels, eps=eps, seed=seed, options=settings)
    state = load_state(resume_path, fingerprint)
    if state is not None:
        noise, done, history = state["noise"], state["round"], state["history"]
        model.load_state_dict(state["surrogate"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])

    extractor = feature_extractor(model)
    while done < rounds and not (history and _separation(history[-1]) >= stop_separation):
        train_epoch(
            model,
            optimizer,
            images + added(noise),
            labels,
            batch_size=batch_size,
            generator=generator,
        )
        extractor.eval()
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            noise[batch] = _minimise_contrastive(
                extractor,
                images[batch],
                labels[batch],
                noise[batch],
                eps=eps,
                steps=noise_steps,
                step_size=step_size,
                temperature=temperature,
                full=full,
            )
        done += 1
        history.append(class_separation(model, images + added(noise), labels))
        logger.info("mi-ue round %d: intra, inter-class cosine %.4f, %.4f", done, *history[-1])
        if resume_path is not None:
            state = {
                "noise": noise,
                "round": done,
                "history": history,
                "surrogate": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
            }
            save_state(resume_path, fingerprint, state)
        if progress is not None:
            intra, inter = history[-1]
            progress(done, rounds, f"intra-class cosine {intra:.3f}, inter-class {inter:.3f}")
    applied = added(noise)
    protected = images + applied
    info: dict[str, Any] = {
        "method": "mi-ue",
        "eps": eps,
        "seed": seed,
        "surrogate": {"source": "the protected images (bi-level)", "arch": surrogate},
        "rounds": done,
        "noise_steps": noise_steps,
        "step_size": step_size,
        "temperature": temperature,
        "stop_separation": stop_separation,
        "block": block,
        "stopped_at": _separation(history[-1]) if history else None,
        "intra_inter_cosine": [[round(v, 4) for v in pair] for pair in history],
        "intra_inter_cosine_clean": list(class_separation(model, images, labels)),
    }
    result = ProtectionResult(images=protected, labels=labels, noise=applied, info=info)
    return result, model.eval()


def _separation(intra_inter: tuple[float, float]) -> float:
    return intra_inter[0] - intra_inter[1]


def _minimise_contrastive(
    extractor: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    noise: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    temperature: float,
    full: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Signed steps down the contrastive loss. Pixel-wise noise is kept projected (each pixel
    is its own, so the [0, 1] cut is exact); a coarse square's value is shared by pixels the
    cut treats differently, so it is only bounded by eps and reaches the image through the
    cut, passing the gradient straight through (as error-minimising noise does)."""
    pixelwise = noise.shape == images.shape
    for _ in range(steps):
        noise = noise.detach().requires_grad_(True)
        noisy = images + noise if pixelwise else clip_straight_through(images + full(noise))
        loss = supervised_contrastive_loss(extractor(noisy), labels, temperature=temperature)
        (grad,) = torch.autograd.grad(loss, noise)
        stepped = noise.detach() - step_size * grad.sign()
        noise = project(images, stepped, eps) if pixelwise else stepped.clamp(-eps, eps)
    return noise.detach()
