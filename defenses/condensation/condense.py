"""The condensation loop both methods share: fresh seeded networks, real batches drawn from the
class pools, progress, and a state file that makes a run resumable (a resumed run ends with the
very images an uninterrupted one would: each iteration's network and real batches are seeded by
(seed, iteration), and the pixels' optimizer state is saved with them)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from defenses.condensation import dc, dm
from defenses.condensation.common import (
    CondensationConfig,
    check_config,
    class_pools,
    fresh_network,
    initial_images,
    iteration_seed,
    load_state,
    sample_real,
    save_state,
    synthetic_labels,
)
from mlcore.datasets import ImageDataset

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]  # (iterations done, iterations, last loss)
Observer = Callable[[int, torch.Tensor], None]  # (iterations done, the synthetic images)
STEPS = {"dc": dc.matching_steps, "dm": dm.matching_steps}
MOMENTUM = 0.5  # SGD momentum on the pixels, both papers'


@dataclass
class CondensedSet:
    """A synthetic set and where it came from: ``members`` are the indices (into ``source``)
    of every real image the run could draw on, the members of any model trained on it."""

    images: torch.Tensor  # float32 (n, C, H, W) in [0, 1], class after class
    labels: torch.Tensor
    source: str  # the dataset spec, e.g. "mnist-embedded:target-train"
    members: list[int]
    config: CondensationConfig  # resolved: every default filled in
    losses: list[float] = field(default_factory=list)  # mean matching loss per iteration
    seconds: float = 0.0

    def provenance(self) -> dict[str, Any]:
        """The checkpoint provenance of a model trained on this set (the members contract)."""
        config = self.config
        return {
            "members": {"dataset": self.source, "indices": self.members},
            "condensed": {
                "method": config.method,
                "ipc": config.ipc,
                "init": config.init,
                "iterations": config.iterations,
                "seed": config.seed,
                "settings": config.to_json(),
            },
        }


def condense(
    dataset: ImageDataset,
    config: CondensationConfig,
    *,
    state_path: Path | None = None,
    save_every: int = 10,
    progress: Progress | None = None,
    observe: Observer | None = None,
) -> CondensedSet:
    """Condense ``dataset`` into ``config.ipc`` synthetic images per class. With ``state_path``
    the run saves its state every ``save_every`` iterations and resumes from it when it exists
    (a finished state returns at once). ``observe`` sees the images before the first iteration
    and after each one (a benchmark measures accuracy against iterations in one run)."""
    check_config(config, dataset.labels, dataset.num_classes)
    config = config.resolved()
    assert config.iterations is not None and config.batch_real is not None
    assert config.lr_images is not None
    real = dataset.as_float()
    pools = class_pools(dataset.labels, dataset.num_classes, config)
    synthetic = initial_images(real, pools, config).requires_grad_(True)
    optimizer = torch.optim.SGD([synthetic], lr=config.lr_images, momentum=MOMENTUM)
    start, losses = 0, []
    if state_path is not None and state_path.exists():
        state = load_state(state_path, config=config, source=dataset.name)
        with torch.no_grad():
            synthetic.copy_(state["images"])
        optimizer.load_state_dict(state["optimizer"])
        start, losses = state["iteration"], list(state["losses"])
        logger.info("resuming %s condensation at iteration %d", config.method, start)
    step = STEPS[config.method]
    started = time.perf_counter()
    if observe is not None:
        observe(start, synthetic.detach())
    for it in range(start, config.iterations):
        generator = torch.Generator().manual_seed(iteration_seed(config.seed, it))
        net = fresh_network(it, config, dataset.input_shape, dataset.num_classes)
        batch = config.batch_real

        def draw_real(generator: torch.Generator = generator, batch: int = batch) -> list:
            return [real[sample_real(pool, batch, generator)] for pool in pools]

        losses.append(
            _step_images(step(net, synthetic, draw_real, config, generator), synthetic, optimizer)
            / dataset.num_classes
        )
        done = it + 1
        if state_path is not None and (done % save_every == 0 or done == config.iterations):
            save_state(
                state_path, config=config, source=dataset.name, iteration=done,
                images=synthetic, optimizer_state=optimizer.state_dict(), losses=losses,
            )  # fmt: skip
        if progress is not None:
            progress(done, config.iterations, losses[-1])
        if observe is not None:
            observe(done, synthetic.detach())
    members = torch.cat(pools).sort().values.tolist()
    return CondensedSet(
        images=synthetic.detach().clone(),
        labels=synthetic_labels(config.ipc, dataset.num_classes),
        source=dataset.name,
        members=members,
        config=config,
        losses=losses,
        seconds=round(time.perf_counter() - started, 1),
    )


def _step_images(
    losses: Iterator[torch.Tensor], synthetic: torch.Tensor, optimizer: torch.optim.Optimizer
) -> float:
    """One optimizer step on the pixels per matching loss, clipped back into [0, 1]; returns
    the mean loss."""
    values = []
    for loss in losses:
        optimizer.zero_grad()
        synthetic.grad = torch.autograd.grad(loss, synthetic)[0]
        optimizer.step()
        with torch.no_grad():
            synthetic.clamp_(0, 1)
        values.append(loss.item())
    return sum(values) / len(values)


def matching_loss(
    condensed_images: torch.Tensor,
    dataset: ImageDataset,
    config: CondensationConfig,
    *,
    networks: int = 3,
    seed: int = 12345,
) -> float:
    """The method's matching loss of a synthetic set, averaged over ``networks`` fresh ConvNets
    and real batches that no condensation iteration used (seeded by ``seed``): a yardstick to
    compare two synthetic sets of the same run, e.g. before and after condensing."""
    config = config.resolved()
    assert config.batch_real is not None
    module = dc if config.method == "dc" else dm
    real = dataset.as_float()
    pools = class_pools(dataset.labels, dataset.num_classes, config)
    probe = CondensationConfig(**{**config.to_json(), "seed": seed})
    total = 0.0
    for index in range(networks):
        generator = torch.Generator().manual_seed(iteration_seed(seed, index))
        net = fresh_network(index, probe, dataset.input_shape, dataset.num_classes)
        batches = [real[sample_real(pool, config.batch_real, generator)] for pool in pools]
        images = condensed_images.detach().clone().requires_grad_(True)
        total += module.matching_loss(net, images, batches, config.ipc).item()
    return total / (networks * dataset.num_classes)
