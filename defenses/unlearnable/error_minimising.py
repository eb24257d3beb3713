"""Error-minimising noise (Huang et al., "Unlearnable Examples", ICLR 2021): the min-min bi-level
optimisation, sample-wise (one noise per image) and class-wise (one noise per class).

Each round (1) trains a surrogate for ``train_steps`` batches on the noisy images, (2) stops if
its accuracy on the noisy training images has reached ``stop_accuracy`` (the paper's rule:
training error below 1%), else (3) moves the noise ``pgd_steps`` signed steps down the
surrogate's loss, within [-eps, eps] and keeping images + noise in [0, 1]. The noise becomes a
shortcut: a feature so easy to learn that a model trained on the noisy images reaches a low
training loss without learning the images.

MNIST departs from the paper's CIFAR-10 in two ways (docs/benchmarks.md measures both):
- its black background lets only brightening noise through the [0, 1] clip there;
- digits are so easy that a surrogate soon knows them, and noise that minimises the loss of a
  digit-knowing model is digit-like: it helps a fresh model instead of misleading it. The
  ``restart_every`` option re-initialises the surrogate every so many rounds (``None`` = never,
  the paper's), so the noise is optimised against models that learnt little. ``decoupled``
  trains the surrogate and steps the noise on images that carry another image's noise and
  label: only the noise tells the label, so the noise is pushed to be readable on its own, a
  shortcut that owes nothing to the digits.
- a trainer reads pixel-fine noise after the digits if at all; ``block`` makes the noise one
  value per ``block`` x ``block`` square (a brightness change per region), read before them.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
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
from mlcore.architectures import arch_kwargs_for, build_model
from mlcore.training import accuracy, train_epoch


@dataclass(frozen=True)
class MinMinSettings:
    """The knobs of the min-min optimisation (defaults: the paper's loop, tuned for MNIST where
    docs/benchmarks.md says so)."""

    surrogate: str = "lenet5"  # an mlcore architecture, trained from scratch on the noisy data
    train_steps: int = 10  # surrogate batches per round (the paper's 10)
    batch_size: int = 64
    learning_rate: float = 1e-3  # Adam, as mlcore.training
    pgd_steps: int = 20  # signed steps on the noise per round (the paper's 20)
    step_size: float | None = None  # None: eps / 10 (the paper's 0.8/255 at eps 8/255)
    noise_sample: int = 500  # class-wise: images per noise step (sample-wise uses all)
    stop_accuracy: float = 0.99  # stop once the surrogate fits the noisy data this well
    min_rounds: int = 1  # never stop before this many noise updates
    max_rounds: int = 30  # and never run more
    restart_every: int | None = None  # re-initialise the surrogate every N rounds (None: never)
    decoupled: bool = False  # pair each image with another image's noise and label (see above)
    block: int = 1  # the noise is constant on block x block squares (see ``coarse_to_full``)

    def check(self) -> None:
        counts = (
            "train_steps",
            "batch_size",
            "pgd_steps",
            "noise_sample",
            "min_rounds",
            "max_rounds",
        )
        for name in counts:
            if getattr(self, name) < 1:
                raise UnlearnableError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_rounds > self.max_rounds:
            raise UnlearnableError(
                f"min_rounds must be <= max_rounds ({self.max_rounds}), got {self.min_rounds}"
            )
        if self.restart_every is not None and self.restart_every < 1:
            raise UnlearnableError(f"restart_every must be >= 1, got {self.restart_every}")
        if not 0 < self.stop_accuracy <= 1:
            raise UnlearnableError(f"stop_accuracy must be in (0, 1], got {self.stop_accuracy}")
        if not self.learning_rate > 0:
            raise UnlearnableError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.step_size is not None and not self.step_size > 0:
            raise UnlearnableError(f"step_size must be > 0, got {self.step_size}")


def protect_classwise(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    eps: float,
    seed: int,
    progress: Progress | None = None,
    resume_path: Path | None = None,
    **options: Any,
) -> ProtectionResult:
    """One error-minimising noise per class (needs labels)."""
    labels = require_labels(labels, "em-classwise")
    return _min_min(
        "em-classwise", images, labels, labels, eps, seed, progress, resume_path, options
    )


def protect_samplewise(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    eps: float,
    seed: int,
    progress: Progress | None = None,
    resume_path: Path | None = None,
    **options: Any,
) -> ProtectionResult:
    """One error-minimising noise per image (needs labels: the surrogate trains on them)."""
    labels = require_labels(labels, "em-samplewise")
    groups = torch.arange(len(labels))
    return _min_min(
        "em-samplewise", images, labels, groups, eps, seed, progress, resume_path, options
    )


def _settings(options: dict[str, Any]) -> MinMinSettings:
    known = set(MinMinSettings.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise UnlearnableError(f"unknown option(s) {unknown}; known: {sorted(known)}")
    settings = MinMinSettings(**options)
    settings.check()
    return settings


def _min_min(
    method: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    eps: float,
    seed: int,
    progress: Progress | None,
    resume_path: Path | None,
    options: dict[str, Any],
) -> ProtectionResult:
    """The min-min loop over a noise tensor with one row per group (class or image)."""
    eps = check_eps(eps)
    images = check_images(images)
    labels = check_labels(labels, len(images))  # type: ignore[assignment]
    settings = _settings(options)
    step_size = settings.step_size if settings.step_size is not None else eps / 10
    num_classes = int(labels.max()) + 1
    groups = groups.long()
    started = time.perf_counter()
    fingerprint = run_fingerprint(
        method, images, labels, eps=eps, seed=seed, options=asdict(settings)
    )

    state = load_state(resume_path, fingerprint)
    generator = torch.Generator().manual_seed(seed)
    shape = coarse_shape(images.shape[1:], settings.block)
    noise = (torch.rand(int(groups.max()) + 1, *shape, generator=generator) * 2 - 1) * eps
    full = functools.partial(coarse_to_full, size=tuple(images.shape[2:]))
    surrogate, optimizer = _fresh_surrogate(settings, images, num_classes, seed, restart=0)
    history: list[dict[str, float]] = []
    rounds_done, restarts, stopped = 0, 0, False
    if state is not None:
        noise, history = state["noise"], state["history"]
        rounds_done, restarts, stopped = state["rounds"], state["restarts"], state["stopped"]
        surrogate, optimizer = _fresh_surrogate(settings, images, num_classes, seed, restarts)
        surrogate.load_state_dict(state["surrogate"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])

    while not stopped and rounds_done < settings.max_rounds:
        if settings.restart_every and rounds_done and rounds_done % settings.restart_every == 0:
            restarts += 1
            surrogate, optimizer = _fresh_surrogate(settings, images, num_classes, seed, restarts)
        # image i carries the noise and the label of image partner[i]: itself, or (decoupled)
        # a random other image, so that only the noise tells the label
        partner = (
            torch.randperm(len(images), generator=generator)
            if settings.decoupled
            else torch.arange(len(images))
        )
        targets = labels[partner]
        noisy = images + project(images, full(noise[groups[partner]]), eps)
        chosen = torch.randint(
            len(images), (settings.train_steps * settings.batch_size,), generator=generator
        )
        loss = train_epoch(
            surrogate,
            optimizer,
            noisy[chosen],
            targets[chosen],
            batch_size=settings.batch_size,
            generator=generator,
        )
        fitted = accuracy(surrogate, noisy, targets)
        stopped = fitted >= settings.stop_accuracy and rounds_done >= settings.min_rounds
        if not stopped:
            noise = _minimise(
                surrogate,
                images,
                targets,
                groups[partner],
                noise,
                eps,
                step_size,
                settings,
                generator,
                full,
            )
            rounds_done += 1
        history.append({"surrogate_loss": loss, "noisy_train_accuracy": fitted})
        if resume_path is not None:
            state = {
                "noise": noise,
                "history": history,
                "rounds": rounds_done,
                "restarts": restarts,
                "stopped": stopped,
                "surrogate": surrogate.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
            }
            save_state(resume_path, fingerprint, state)
        if progress is not None:
            progress(rounds_done, settings.max_rounds, f"surrogate fits noisy data {fitted:.1%}")

    applied = project(images, full(noise[groups]), eps)
    info = {
        "method": method,
        "eps": eps,
        "seed": seed,
        "settings": asdict(settings),
        "rounds": rounds_done,
        "stopped_by": "stop_accuracy" if stopped else "max_rounds",
        "stop_value": history[-1]["noisy_train_accuracy"] if history else None,
        "surrogate": {
            "arch": settings.surrogate,
            "source": "trained from scratch on the noisy images, alternating with the noise",
            "restarts": restarts,
        },
        "history": history,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return ProtectionResult((images + applied).float(), labels.clone(), applied.float(), info)


def _fresh_surrogate(
    settings: MinMinSettings,
    images: torch.Tensor,
    num_classes: int,
    seed: int,
    restart: int,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A surrogate seeded by (seed, restart) without touching torch's global generator, so a
    resumed run rebuilds the very network an uninterrupted one had."""
    shape = tuple(images.shape[1:])
    try:
        kwargs = arch_kwargs_for(settings.surrogate, shape, num_classes)  # type: ignore[arg-type]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + restart)
            model = build_model(settings.surrogate, **kwargs)
            model(images[:2])
    except (ValueError, RuntimeError) as exc:
        raise UnlearnableError(
            f"surrogate {settings.surrogate!r} does not fit images of shape {list(shape)}: "
            f"{str(exc)[:200]}"
        ) from None
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    return model, optimizer


def _minimise(
    surrogate: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    noise: torch.Tensor,
    eps: float,
    step_size: float,
    settings: MinMinSettings,
    generator: torch.Generator,
    full: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``pgd_steps`` signed descent steps of the surrogate's summed loss with respect to the
    noise rows. A class's row collects the gradients of its images; with fewer rows than images
    (class-wise) each step looks at a random ``noise_sample`` of them, which estimates a class's
    gradient well at a fraction of the cost; sample-wise rows each need their own image.

    The [0, 1] clip passes the gradient straight through (as the authors' code, which steps
    the clipped image): with a plain clip, noise that starts negative on MNIST's black
    background gets no gradient and stays dead for good."""
    surrogate.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    sampled = len(noise) < len(images) and settings.noise_sample < len(images)
    for _ in range(settings.pgd_steps):
        if sampled:
            chosen = torch.randperm(len(images), generator=generator)[: settings.noise_sample]
        else:
            chosen = torch.arange(len(images))
        noise.requires_grad_(True)
        gradient = torch.zeros_like(noise)
        for batch in chosen.split(500):
            noisy = clip_straight_through(images[batch] + full(noise[groups[batch]]))
            loss = loss_fn(surrogate(noisy), labels[batch])
            gradient += torch.autograd.grad(loss, noise)[0]
        noise = (noise.detach() - step_size * gradient.sign()).clamp(-eps, eps)
    return noise
