"""The calibration beside a checkpoint reaches the hosted model's detector settings: applied by
default, overridden by an explicit threshold, and ignored (with a warning) when it was made for
another checkpoint or other detector settings, or is missing."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from defenses.calibration import Calibration
from defenses.prada import DEFAULT_DELTA
from target_service.zoo import TARGETS, calibrate_target, calibration_path, load_hosted

NAME = "lenet5-mnist"


@pytest.fixture(scope="module")
def calibrated(trained_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the session's tiny checkpoint, calibrated quickly (9 clients, 10% share)."""
    checkpoint_dir = tmp_path_factory.mktemp("calibrated")
    for path in trained_checkpoints.glob(f"{NAME}*"):
        shutil.copy(path, checkpoint_dir / path.name)
    calibration = calibrate_target(TARGETS[NAME], checkpoint_dir, share=0.1, horizon=200, clients=9)
    return checkpoint_dir, calibration


def detector_settings(checkpoint_dir: Path, detectors=None) -> dict:
    hosted = load_hosted(NAME, checkpoint_dir, train_missing=False, detectors=detectors)
    return hosted.defence.detectors


def test_the_service_uses_the_calibrated_thresholds(calibrated):
    checkpoint_dir, calibration = calibrated
    assert calibration_path(checkpoint_dir, NAME).exists()
    assert Calibration.load(calibration_path(checkpoint_dir, NAME)) == calibration
    settings = detector_settings(checkpoint_dir)
    assert settings["prada"] == {"delta": calibration.threshold("prada")}
    assert settings["mi_redundancy"]["threshold"] == calibration.threshold("mi_redundancy")
    assert calibration.threshold("prada") != DEFAULT_DELTA
    assert calibration.source["checkpoint_sha256"] and calibration.source["model"] == NAME


def test_an_explicit_threshold_overrides_the_calibration(calibrated):
    checkpoint_dir, calibration = calibrated
    settings = detector_settings(checkpoint_dir, {"prada": {"delta": 0.9}, "mi_redundancy": {}})
    assert settings["prada"] == {"delta": 0.9}
    assert settings["mi_redundancy"]["threshold"] == calibration.threshold("mi_redundancy")


def test_a_calibration_for_other_settings_is_not_applied(calibrated, caplog):
    checkpoint_dir, _ = calibrated
    with caplog.at_level(logging.WARNING, logger="target_service.zoo"):
        settings = detector_settings(checkpoint_dir, {"mi_redundancy": {"test_every": 5}})
    assert "threshold" not in settings["mi_redundancy"]
    assert "calibrated mi_redundancy with settings {}, not {'test_every': 5}" in caplog.text


def test_a_calibration_for_another_checkpoint_or_none_is_not_applied(calibrated, tmp_path, caplog):
    checkpoint_dir, _ = calibrated
    for path in checkpoint_dir.iterdir():
        shutil.copy(path, tmp_path / path.name)
    stale = calibration_path(tmp_path, NAME)
    data = json.loads(stale.read_text())
    data["source"]["checkpoint_sha256"] = "0" * 64  # as if the model had been retrained
    stale.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="target_service.zoo"):
        assert detector_settings(tmp_path)["prada"] == {}
    assert "made for another checkpoint" in caplog.text
    stale.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="target_service.zoo"):
        assert detector_settings(tmp_path)["prada"] == {}
    assert "has no detector calibration" in caplog.text


def test_train_and_first_start_calibrate_with_the_same_quick_client_count():
    """`train`'s option default is a literal (the CLI imports no torch before it runs)."""
    import inspect

    from defenses.calibration import QUICK_CLIENTS
    from target_service.cli import train
    from target_service.settings import Settings

    default = inspect.signature(train).parameters["calibration_clients"].default
    assert default == Settings().calibration_clients == QUICK_CLIENTS
