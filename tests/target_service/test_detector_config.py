"""Detector settings are checked when the service starts (issue 8, item 8): names of models,
detectors and settings in ``Settings``, before any model loads; values and MI references when
the detectors are built at start-up. Either way ``serve`` exits non-zero, naming key and value."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from defenses.base import DetectorError, check_setting_names
from defenses.mi_redundancy import STATISTIC, MiReference
from target_service.detection import DefenceConfig, build_detectors
from target_service.settings import Settings
from target_service.testing import LiveServer, ServerStartError
from target_service.zoo import mi_reference_path
from tests.target_service.test_api import make_app

MODEL = "lenet5-mnist"
REFERENCE = MiReference(0.5, (0.5,), {"window": 100, "bins": 256, "statistic": STATISTIC})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"detectors": {MODEL: {"pradaa": {}}}},
            r"TARGET_DETECTORS\['lenet5-mnist'\]\['pradaa'\]: detector must be one of "
            r"\['mi_redundancy', 'prada'\], got 'pradaa'",
        ),
        (
            {"detectors": {MODEL: {"prada": {"dleta": 0.9}}}},
            r"TARGET_DETECTORS\['lenet5-mnist'\]\['prada'\]: detector 'prada' has no "
            r"setting\(s\) \['dleta'\]; its settings are \['delta', 'max_stored'\]",
        ),
        (
            {"detectors": {"c3f2-mnist": {"prada": {}}}},
            r"TARGET_DETECTORS names model 'c3f2-mnist', which is not hosted",
        ),
        (
            {"alarm_policies": {"c3f2-mnist": "block"}},
            r"TARGET_ALARM_POLICIES names model 'c3f2-mnist', which is not hosted",
        ),
        ({"alarm_policies": {MODEL: "blok"}}, r"alarm_policies.lenet5-mnist\n.*'blok'"),
        ({"detectors": {MODEL: {"prada": 0.95}}}, r"detectors.lenet5-mnist.prada\n.*0.95"),
    ],
)
def test_settings_refuse_unknown_names_naming_key_and_value(
    overrides: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TARGET_MODELS", json.dumps([MODEL]))
    for key, value in overrides.items():  # as the service reads them: environment variables
        monkeypatch.setenv(f"TARGET_{key.upper()}", json.dumps(value))
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_settings_accept_known_names_and_leave_values_to_the_detectors() -> None:
    settings = Settings(
        models=[MODEL],
        detectors={MODEL: {"prada": {"delta": 0.9}, "mi_redundancy": {"window": 100}}},
        alarm_policies={MODEL: "block"},
    )
    assert settings.detectors[MODEL]["prada"] == {"delta": 0.9}
    check_setting_names("mi_redundancy", {"reference": "x", "test_every": 5})


@pytest.mark.parametrize(
    ("detectors", "message"),
    [
        (
            {"prada": {"delta": "0.9"}},
            r"TARGET_DETECTORS\['lenet5-mnist'\]\['prada'\]: delta must be a number in "
            r"\(0, 1\), got '0.9'",
        ),
        (
            {"mi_redundancy": {"reference": REFERENCE, "test_every": "10"}},
            r"\['mi_redundancy'\]: test_every must be an integer, got '10'",
        ),
        (
            {"mi_redundancy": {"reference": REFERENCE, "window": 50}},
            r"\['mi_redundancy'\]: window=50 does not match the reference, which was "
            r"calibrated with window=100",
        ),
        (
            {"mi_redundancy": {"reference": "/nowhere/ref.json"}},
            r"\['mi_redundancy'\]: MI reference file /nowhere/ref.json does not exist",
        ),
        ({"mi_redundancy": {}}, r"\['mi_redundancy'\]: bad settings .*'reference'"),
    ],
)
def test_detector_values_and_references_are_checked_when_built(
    detectors: dict[str, dict[str, Any]], message: str
) -> None:
    with pytest.raises(DetectorError, match=message):
        build_detectors({MODEL: DefenceConfig(detectors)})


def test_reference_file_of_another_window_stops_the_app_naming_the_file(
    tmp_path: Path, trained_checkpoints: Path
) -> None:
    reference = mi_reference_path(trained_checkpoints, MODEL)
    app = make_app(
        tmp_path, trained_checkpoints, detectors={MODEL: {"mi_redundancy": {"window": 50}}}
    )
    with pytest.raises(DetectorError) as info, app:  # the start-up (lifespan) fails
        pass
    assert str(info.value) == (
        f"TARGET_DETECTORS['lenet5-mnist']['mi_redundancy']: window=50 does not match the "
        f"reference {reference}, which was calibrated with window=100; recalibrate or use "
        f"window=100"
    )


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("settings", "code", "message"),
    [
        (  # refused by Settings, before any model loads
            {"detectors": {MODEL: {"prada": {"dleta": 0.9}}}},
            2,
            "TARGET_DETECTORS['lenet5-mnist']['prada']: detector 'prada' has no setting(s) "
            "['dleta']",
        ),
        (  # refused when the detectors are built at start-up, against the stored reference
            {"detectors": {MODEL: {"mi_redundancy": {"window": 50}}}},
            3,
            "TARGET_DETECTORS['lenet5-mnist']['mi_redundancy']: window=50 does not match",
        ),
    ],
)
def test_serve_exits_non_zero_naming_the_bad_setting(
    live_server_factory: Callable[..., LiveServer],
    settings: dict[str, Any],
    code: int,
    message: str,
) -> None:
    with pytest.raises(ServerStartError) as info:
        live_server_factory(**settings)
    assert f"exited with code {code} " in str(info.value)
    assert message in str(info.value)
