"""Hosted models trained on a condensed set or a random real subset (issue 11, item 2): the
names that spell them, and the members their checkpoints record (the members contract)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from defenses.condensation import CondensationConfig
from mlcore.checkpoints import load_checkpoint
from mlcore.datasets import load_dataset
from target_service.cli import app
from target_service.zoo import TARGETS, target_spec, train_target


@pytest.mark.parametrize(
    ("name", "condensation", "member_count"),
    [
        ("lenet5-mnist-dm10-noise", ("dm", 10, "noise"), None),
        ("convnet-mnist-dc1-real", ("dc", 1, "real"), None),
        ("c3f2-mnist-subset100", None, 100),
        ("lenet5-mnist", None, None),
    ],
)
def test_derived_target_names(name, condensation, member_count) -> None:
    spec = target_spec(name)
    assert spec.name == name and spec.member_count == member_count
    if condensation is None:
        assert spec.condensation is None
    else:
        config = spec.condensation
        assert config is not None
        assert (config.method, config.ipc, config.init) == condensation


@pytest.mark.parametrize(
    "name", ["vgg-mnist", "vgg-mnist-dm10-noise", "lenet5-mnist-km10-noise", "lenet5-mnist-dm10"]
)
def test_unknown_target_names_are_refused(name) -> None:
    with pytest.raises(ValueError, match=rf"got '{name}'"):
        target_spec(name)


@pytest.fixture
def no_mi_reference(monkeypatch):
    """The MI detector's reference (measured on the whole split, a minute on a loaded machine)
    is not what these tests are about."""
    monkeypatch.setattr("target_service.zoo.mi_reference", lambda *args: None)


@pytest.mark.usefixtures("no_mi_reference")
def test_a_subset_target_records_its_members(tmp_path) -> None:
    spec = target_spec("lenet5-mnist-subset100")
    path = train_target(spec, tmp_path, epochs=1)
    checkpoint = load_checkpoint(path)
    members = checkpoint.provenance["members"]
    assert members["dataset"] == checkpoint.dataset == "mnist-embedded:target-train"
    assert len(members["indices"]) == 100 and members["indices"] == sorted(set(members["indices"]))
    labels = load_dataset("mnist-embedded:target-train").labels[members["indices"]]
    assert torch.bincount(labels).tolist() == [10] * 10  # class-balanced
    # as many optimiser steps as one epoch on the 2,500-image split
    assert checkpoint.metrics["train_size"] == 100 and checkpoint.metrics["epochs"] == 25


@pytest.mark.usefixtures("no_mi_reference")
def test_a_condensed_target_records_the_pools_it_drew_from(tmp_path) -> None:
    config = CondensationConfig(
        method="dm", ipc=1, init="real", iterations=2, width=16, batch_real=8, pool_per_class=5
    )
    spec = replace(TARGETS["lenet5-mnist"], name="lenet5-mnist-dm1-real", condensation=config)
    checkpoint = load_checkpoint(train_target(spec, tmp_path, epochs=1))
    provenance = checkpoint.provenance
    assert provenance["condensed"]["method"] == "dm"
    assert (provenance["condensed"]["ipc"], provenance["condensed"]["init"]) == (1, "real")
    assert (provenance["condensed"]["iterations"], provenance["condensed"]["seed"]) == (2, 0)
    indices = provenance["members"]["indices"]
    assert provenance["members"]["dataset"] == "mnist-embedded:target-train"
    assert len(indices) == 50 and indices == sorted(set(indices))
    assert checkpoint.metrics["train_size"] == 10


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--condense", "kmeans"], "method must be one of"),
        (["--condense", "dm", "--init", "zeros"], "init must be one of"),
        (["--condense", "dm", "--ipc", "0"], "ipc must be >= 1, got 0"),
        (["--condense", "dm", "--members", "100"], "exclude each other"),
        (["--model", "vgg"], "got 'vgg'"),
    ],
)
def test_train_refuses_bad_condensation_settings_before_training(tmp_path, args, message) -> None:
    result = CliRunner().invoke(app, ["train", "--checkpoint-dir", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split()).replace("│", "")
    assert not list(tmp_path.iterdir())  # nothing trained
