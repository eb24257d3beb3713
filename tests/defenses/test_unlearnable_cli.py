"""``defender protect`` and ``npz:PATH``: the command writes an npz of the upload format and a
PNG, removes its state when done, and refuses bad input by name; the npz is a dataset the
registry serves, so the attacker can select from it as its pool."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from attacker.cli import app as attacker_app
from defenses.cli import app
from defenses.unlearnable import METHODS
from mlcore.datasets import DatasetError, load_dataset, read_npz

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def flat(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


@pytest.fixture(scope="module")
def protected(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("protect") / "protected.npz"
    result = CliRunner().invoke(
        app, ["protect", "--method", "random", "--eps", "32/255", "--seed", "4", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    with np.load(out, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return {"path": out, **arrays}


def test_protect_writes_an_uploadable_npz_and_a_png(protected: dict) -> None:
    images, labels, noise = protected["images"], protected["labels"], protected["noise"]
    clean = load_dataset("mnist-embedded:pool")
    assert images.dtype == np.float32 and images.shape == (1500, 1, 28, 28)
    assert images.min() >= 0 and images.max() <= 1
    assert np.abs(noise).max() <= 32 / 255 + 1e-6
    np.testing.assert_allclose(images, clean.as_float().numpy() + noise, atol=1e-6)
    assert labels.dtype == np.int64 and np.array_equal(labels, clean.labels.numpy())
    info = json.loads(str(protected["info"]))
    assert (
        info["method"] == "random" and info["seed"] == 4 and info["source"] == "mnist-embedded:pool"
    )
    assert math.isclose(info["eps"], 32 / 255)
    path = protected["path"]
    assert path.with_suffix(".png").stat().st_size > 1000
    assert not path.with_name(path.name + ".state.pt").exists()


def test_the_npz_is_a_dataset_and_an_attacker_pool(protected: dict, tmp_path) -> None:
    spec = f"npz:{protected['path']}"
    dataset = load_dataset(spec)
    assert dataset.images.dtype.is_floating_point is False and len(dataset) == 1500
    assert dataset.num_classes == 10
    # float images are rounded to 8 bits: within half a grey level of what was written
    assert np.abs(dataset.as_float().numpy() - protected["images"]).max() <= 0.5 / 255 + 1e-6
    selection = tmp_path / "selection.json"
    result = CliRunner().invoke(
        attacker_app,
        ["select", "--method", "random", "--pool", spec, "--k", "20", "-o", str(selection)],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(selection.read_text())["pool"] == spec


def test_list_names_every_registered_method() -> None:
    result = CliRunner().invoke(app, ["protect", "--list"])
    assert result.exit_code == 0
    for name in METHODS:
        assert f"{name}:" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "random", "--eps", "0"], "eps must be in (0, 1] (images are in [0, 1]), got 0.0"),
        (["--method", "random", "--eps", "300/255"], "got 1.1764705882352942 (from '300/255')"),
        (["--method", "random", "--eps", "big"], "--eps must be a number or a fraction like 32/255, got 'big'"),
        (["--method", "nope"], "--method must be one of"),
        (["--method", "em-classwise", "--no-labels"], "em-classwise is class-wise (or trains on labels) and needs labels"),
        (["--method", "random", "--option", "x"], "--option must look like KEY=VALUE, got 'x'"),
        (["--method", "em-classwise", "--option", "max_round=2"], "unknown option(s) ['max_round']"),
    ],
)  # fmt: skip
def test_protect_refuses_bad_input_by_name(tmp_path, args: list[str], message: str) -> None:
    out = tmp_path / "x.npz"
    result = CliRunner().invoke(app, ["protect", *args, "-o", str(out)])
    assert result.exit_code == 2
    assert message in flat(result.output)
    assert not out.exists()


def test_an_npz_that_is_not_images_plus_labels_is_refused(tmp_path) -> None:
    only_images = tmp_path / "only.npz"
    np.savez(only_images, pictures=np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DatasetError, match=r"must hold 'images' and 'labels'.*\['pictures'\]"):
        load_dataset(f"npz:{only_images}")
    out_of_range = tmp_path / "bright.npz"
    np.savez(out_of_range, images=np.full((3, 28, 28), 2.0, np.float32), labels=np.arange(3))
    with pytest.raises(DatasetError, match=r"must lie in \[0, 1\], got values in \[2, 2\]"):
        read_npz(out_of_range)
    result = CliRunner().invoke(
        app, ["protect", "--method", "random", "--images", f"npz:{out_of_range}", "-o", str(tmp_path / "y.npz")]
    )  # fmt: skip
    assert result.exit_code == 2 and "got values in [2, 2]" in flat(result.output)
    text = tmp_path / "text.npz"
    text.write_text("not an npz")
    with pytest.raises(DatasetError, match="cannot read an npz dataset"):
        load_dataset(f"npz:{text}")


def test_a_label_less_npz_pool_reaches_the_method_without_labels(tmp_path) -> None:
    """A scraped pool (images only) is accepted by the command; a class-wise method on it says
    it needs labels."""
    pool = tmp_path / "scraped.npz"
    np.savez(pool, images=np.zeros((20, 28, 28), np.uint8))
    result = CliRunner().invoke(
        app, ["protect", "--method", "random", "--images", f"npz:{pool}", "-o", str(tmp_path / "z.npz")]
    )  # fmt: skip
    assert result.exit_code == 2 and "random is class-wise" in flat(result.output)
