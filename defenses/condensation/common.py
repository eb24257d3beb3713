"""What both condensation methods share: the settings and their checks, the real class pools the
synthetic images are matched against, the initial synthetic set, the fresh networks of each
iteration, and the files a run writes (resumable state, npz dataset, PNG grid).

Images are optimised in the models' input space (float in [0, 1], as ``mlcore.training``
feeds every model) and clipped back into it after each step, so the synthetic set is a valid
upload and a model trained on it sees exactly what the condensation optimised.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from mlcore.architectures import arch_kwargs_for, build_model

METHODS = ("dc", "dm")
INITS = ("noise", "real")
IMAGES_PER_CLASS = (1, 10, 50)  # the papers' settings; any ipc a class can fill is accepted

# DC's outer / inner loops per images-per-class, the authors' (Zhao et al. 2021, Section 4 and
# their code): the synthetic set is updated ``outer`` times per fresh network, and the network
# is trained ``inner`` epochs on the synthetic set between two updates.
DC_LOOPS = {1: (1, 1), 10: (10, 50), 50: (50, 10)}


class CondensationError(ValueError):
    """A condensation setting, dataset or state file that cannot be used."""


@dataclass(frozen=True)
class CondensationConfig:
    """One condensation run. The defaults finish in minutes on 2 CPU cores at 10 images per
    class on the embedded MNIST (docs/benchmarks.md measures accuracy against ``iterations``);
    the papers ran 1,000 (DC) and 20,000 (DM) iterations on a GPU."""

    method: Literal["dc", "dm"]
    ipc: int = 10
    init: Literal["noise", "real"] = "noise"
    iterations: int | None = None  # None: the method's default (DEFAULT_ITERATIONS)
    seed: int = 0
    batch_real: int | None = None  # real images per class per matching step; None: default
    lr_images: float | None = None  # SGD (momentum 0.5) on the pixels; None: the method's
    pool_per_class: int | None = None  # real images per class to condense from; None: all
    outer_loop: int | None = None  # DC only; None: DC_LOOPS (clipped for speed, see dc.py)
    inner_loop: int | None = None  # DC only
    width: int = 128  # the ConvNet the images are matched through (the authors' 128 x 3)
    depth: int = 3

    def resolved(self) -> CondensationConfig:
        """The same run with every default filled in (what a state file and provenance record)."""
        from defenses.condensation import dc, dm

        module = dc if self.method == "dc" else dm
        filled = module.defaults(self.ipc)
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name, value in filled.items():
            if values[name] is None:
                values[name] = value
        return CondensationConfig(**values)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        """Refuse settings that no data could satisfy, naming the value (``check_config`` also
        checks them against the data)."""
        if self.method not in METHODS:
            raise CondensationError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if self.init not in INITS:
            raise CondensationError(f"init must be one of {list(INITS)}, got {self.init!r}")
        positive = {
            "ipc": self.ipc,
            "iterations": self.iterations,
            "batch_real": self.batch_real,
            "outer_loop": self.outer_loop,
            "inner_loop": self.inner_loop,
            "width": self.width,
            "depth": self.depth,
        }
        for name, value in positive.items():
            if value is not None and value < 1:
                raise CondensationError(f"{name} must be >= 1, got {value}")
        if self.lr_images is not None and not self.lr_images > 0:
            raise CondensationError(f"lr_images must be > 0, got {self.lr_images}")


def check_config(config: CondensationConfig, labels: torch.Tensor, num_classes: int) -> None:
    """Refuse settings the data cannot satisfy, naming the value."""
    config.check()
    counts = torch.bincount(labels, minlength=num_classes)
    smallest = int(counts.min())
    pool = config.pool_per_class if config.pool_per_class is not None else smallest
    if config.pool_per_class is not None and not 1 <= config.pool_per_class <= smallest:
        raise CondensationError(
            f"pool_per_class must be in 1..{smallest} (the smallest class has {smallest} "
            f"images), got {config.pool_per_class}"
        )
    if not 1 <= config.ipc <= pool:
        raise CondensationError(
            f"ipc must be in 1..{pool} (images per class available to condense from), "
            f"got {config.ipc}"
        )


def class_pools(
    labels: torch.Tensor, num_classes: int, config: CondensationConfig
) -> list[torch.Tensor]:
    """Per class, the indices (into the dataset) of the real images the run may use: all of the
    class, or a seeded sample of ``pool_per_class`` of them. Their union is the set of members
    of any model trained on the condensed set."""
    generator = torch.Generator().manual_seed(config.seed)
    pools = []
    for cls in range(num_classes):
        members = torch.nonzero(labels == cls).flatten()
        if config.pool_per_class is not None:
            members = members[torch.randperm(len(members), generator=generator)]
            members = members[: config.pool_per_class].sort().values
        pools.append(members)
    return pools


def initial_images(
    real: torch.Tensor, pools: list[torch.Tensor], config: CondensationConfig
) -> torch.Tensor:
    """The starting synthetic set, class after class: ``real`` images drawn from each class pool,
    or uniform noise in [0, 1] (seeded either way)."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    shape = (config.ipc * len(pools), *real.shape[1:])
    if config.init == "noise":
        return torch.rand(shape, generator=generator)
    chosen = [pool[torch.randperm(len(pool), generator=generator)[: config.ipc]] for pool in pools]
    return real[torch.cat(chosen)].clone()


def synthetic_labels(ipc: int, num_classes: int) -> torch.Tensor:
    return torch.arange(num_classes).repeat_interleave(ipc)


def fresh_network(
    iteration: int, config: CondensationConfig, input_shape: tuple[int, int, int], classes: int
) -> nn.Sequential:
    """A freshly initialised ConvNet for one iteration, seeded by (seed, iteration) without
    touching torch's global generator, so a resumed run meets the networks an uninterrupted
    one would."""
    kwargs = arch_kwargs_for("convnet", input_shape, classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(iteration_seed(config.seed, iteration))
        model = build_model("convnet", **kwargs, width=config.width, depth=config.depth)
    assert isinstance(model, nn.Sequential)
    return model


def iteration_seed(seed: int, iteration: int) -> int:
    return (seed * 1_000_003 + iteration) % (2**63)


def sample_real(pool: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` indices drawn without replacement from ``pool`` (all of it when it is smaller)."""
    return pool[torch.randperm(len(pool), generator=generator)[:count]]


# -- files ---------------------------------------------------------------------------------------
def save_state(
    path: Path,
    *,
    config: CondensationConfig,
    source: str,
    iteration: int,
    images: torch.Tensor,
    optimizer_state: dict[str, Any],
    losses: list[float],
) -> None:
    """Write the resumable state atomically (temp file + rename)."""
    payload = {
        "config": json.dumps(config.to_json(), sort_keys=True),
        "source": source,
        "iteration": iteration,
        "images": images.detach().clone(),
        "optimizer": optimizer_state,
        "losses": list(losses),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_state(path: Path, *, config: CondensationConfig, source: str) -> dict[str, Any]:
    """Read a state file written by ``save_state`` for this very run (same settings, same data)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt file
        raise CondensationError(f"cannot read condensation state {path}: {exc}") from None
    wanted = json.dumps(config.to_json(), sort_keys=True)
    if payload.get("config") != wanted or payload.get("source") != source:
        raise CondensationError(
            f"state file {path} belongs to another run ({payload.get('source')}, "
            f"{payload.get('config')}); not {source}, {wanted}: use another --state path"
        )
    return payload


def save_npz(path: Path, images: torch.Tensor, labels: torch.Tensor, provenance: dict) -> Path:
    """The condensed set as an upload the training API accepts: float32 images in [0, 1]
    (n, C, H, W), int64 labels, and the provenance as a JSON string (no pickle needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez_compressed(
            handle,
            images=images.detach().clamp(0, 1).numpy().astype(np.float32),
            labels=labels.numpy().astype(np.int64),
            provenance=np.array(json.dumps(provenance, sort_keys=True)),
        )
    return path


def load_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a condensed (or any uploadable) npz: images as float32 in [0, 1] (n, C, H, W), not
    re-quantised, and int64 labels."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, KeyError, ValueError) as exc:
        raise CondensationError(f"cannot read a dataset npz at {path}: {exc}") from None
    tensor = torch.from_numpy(images if images.ndim == 4 else images[:, None])
    tensor = tensor.float().div(255) if tensor.dtype == torch.uint8 else tensor.float()
    return tensor, torch.from_numpy(labels).long()


def save_grid(path: Path, images: torch.Tensor, ipc: int) -> Path:
    """A PNG of the synthetic set: one row per class (at most 10 images per row shown)."""
    from torchvision.utils import save_image

    shown = images.detach().clamp(0, 1).reshape(-1, ipc, *images.shape[1:])[:, :10]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(shown.reshape(-1, *images.shape[1:]), path, nrow=shown.shape[1], padding=2)
    return path
