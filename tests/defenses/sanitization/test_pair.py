"""Self sanitisation and the sanitised pair: exactly the confident images are kept, the
checkpoint describes itself and its parent, a mismatching parent is refused, every bad input
is a SanitizationError naming the value and leaves nothing on disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from defenses.sanitization import (
    SanitizationError,
    build_sanitized_pair,
    load_sanitized_pair,
    sanitized_checkpoint_path,
)
from defenses.sanitization.pair import file_sha256
from mlcore.architectures import build_model
from mlcore.checkpoints import load_checkpoint, save_checkpoint
from mlcore.datasets import load_dataset
from mlcore.training import predict_logits
from tests.defenses.sanitization.conftest import PARENT_EPOCHS, SELF_THRESHOLD


def test_self_sanitisation_keeps_exactly_the_images_at_or_above_the_threshold(
    self_pair, parent_path
):
    parent = load_checkpoint(parent_path)
    train = load_dataset(parent.dataset)
    logits = predict_logits(parent.model, train.images).double()
    confidence = torch.softmax(logits, dim=1)[torch.arange(len(train)), train.labels].numpy()
    expected = np.flatnonzero(confidence >= SELF_THRESHOLD)
    kept = self_pair.provenance["kept_indices"]
    assert kept == expected.tolist()
    assert 0 < len(kept) < len(train)  # the threshold really dropped images, and kept some
    assert self_pair.metrics["train_size"] == len(kept)


def test_the_checkpoint_names_its_parent_method_threshold_and_detector(self_pair, parent_path):
    provenance = self_pair.provenance
    assert provenance["parent"] == parent_path.name
    assert provenance["parent_sha256"] == file_sha256(parent_path)
    assert (provenance["method"], provenance["threshold"]) == ("self", SELF_THRESHOLD)
    assert (provenance["parent_epochs"], provenance["sanitized_epochs"]) == (
        PARENT_EPOCHS,
        PARENT_EPOCHS,
    )
    assert (provenance["score_kind"], provenance["pass_rate"]) == ("kl", 0.98)
    assert self_pair.score_threshold == provenance["score_threshold"] > 0
    assert provenance["calibration_data"] == "mnist-embedded:test"
    assert not self_pair.parent.training and not self_pair.sanitized.training


def test_assess_scores_and_flags_a_batch(self_pair):
    test = load_dataset("mnist-embedded:test")
    x = test.as_float()[:50]
    result = self_pair.assess(x)
    assert result.scores.dtype == np.float64 and result.scores.shape == (50,)
    np.testing.assert_array_equal(result.flagged, result.scores > self_pair.score_threshold)
    assert torch.equal(result.parent_logits, predict_logits(self_pair.parent, x))
    with pytest.raises(SanitizationError, match="float \\(n, C, H, W\\)"):
        self_pair.assess(test.images[:2])


def test_a_different_parent_file_is_refused(self_pair_path, tmp_path):
    other = tmp_path / "other.pt"
    save_checkpoint(
        other, build_model("lenet5"), arch="lenet5", dataset="mnist-embedded:target-train"
    )
    with pytest.raises(SanitizationError, match=r"was built from parent lenet5-mnist\.pt"):
        load_sanitized_pair(self_pair_path, other)


def test_a_sanitised_model_of_another_architecture_is_refused(
    self_pair_path, parent_path, tmp_path
):
    forged = tmp_path / "forged.pt"
    provenance = load_checkpoint(self_pair_path).provenance
    save_checkpoint(
        forged,
        build_model("c3f2"),
        arch="c3f2",
        dataset="mnist-embedded:target-train",
        provenance=provenance,
    )
    with pytest.raises(SanitizationError, match="has architecture \\('c3f2'"):
        load_sanitized_pair(forged, parent_path)


def test_a_plain_checkpoint_is_not_a_sanitised_one(parent_path):
    with pytest.raises(SanitizationError, match="is not a sanitised checkpoint"):
        load_sanitized_pair(parent_path, parent_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"threshold": 0.0}, "threshold must be in \\(0, 1\\), got 0.0"),
        ({"threshold": 1.0}, "threshold must be in \\(0, 1\\), got 1.0"),
        ({"pass_rate": 1.0}, "pass_rate must be in \\(0, 1\\), got 1.0"),
        ({"pass_rate": -0.1}, "pass_rate must be in \\(0, 1\\), got -0.1"),
        ({"method": "oracle"}, "method must be one of \\['self', 'canonical'\\], got 'oracle'"),
        ({"score": "l2"}, "score must be one of \\['kl', 'js', 'disagree'\\], got 'l2'"),
        ({"epochs": 0}, "epochs must be >= 1, got 0"),
    ],
)
def test_bad_parameters_are_named_and_nothing_is_written(parent_path, tmp_path, overrides, message):
    arguments = {"method": "self", "threshold": 0.9, "epochs": 1} | overrides
    out = tmp_path / "sanitized.pt"
    with pytest.raises(SanitizationError, match=message):
        build_sanitized_pair(parent_path, out_path=out, **arguments)
    assert list(tmp_path.iterdir()) == []


def test_too_few_images_left_says_how_many_at_which_threshold(trained_checkpoints, tmp_path):
    # the session's 1-epoch target is confident to 1 - 1e-7 on few images (if any) of each class
    out = tmp_path / "sanitized.pt"
    weak_parent = trained_checkpoints / "lenet5-mnist.pt"
    with pytest.raises(
        SanitizationError, match=r"too few images left: \d+ of 2500 .* >= 0.9999999"
    ):
        build_sanitized_pair(
            weak_parent, method="self", threshold=0.9999999, epochs=1, out_path=out
        )
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_missing_parent_or_the_parent_as_output_is_refused(parent_path, tmp_path):
    with pytest.raises(SanitizationError, match="checkpoint not found"):
        build_sanitized_pair(
            tmp_path / "nope.pt", method="self", threshold=0.9, out_path=tmp_path / "o.pt"
        )
    with pytest.raises(SanitizationError, match="out_path must differ"):
        build_sanitized_pair(parent_path, method="self", threshold=0.9, out_path=parent_path)


def test_default_path_sits_beside_the_parent(parent_path):
    assert sanitized_checkpoint_path(parent_path, "self") == parent_path.with_name(
        "lenet5-mnist.sanitized-self.pt"
    )


def test_a_copied_parent_with_the_same_bytes_is_accepted(self_pair_path, parent_path, tmp_path):
    copy = tmp_path / "renamed.pt"
    shutil.copy(parent_path, copy)
    pair = load_sanitized_pair(self_pair_path, copy)
    assert pair.method == "self"
    assert Path(pair.provenance["parent"]).name == "lenet5-mnist.pt"
