"""The flagged-share alarm of an input defence: fires exactly when ceil(share x window) of the
last ``window`` images are flagged, forgets images that left the window, never fires on a few."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from defenses.base import DetectorError
from defenses.rejection_alarm import RejectedShareAlarm


@pytest.mark.parametrize(
    ("window", "share", "flags", "fires_at"),
    [
        (10, 0.3, [0, 1, 0, 0, 1, 0, 0, 1, 0, 0], 8),  # the 3rd flag within 10
        (10, 0.3, [1, 1] + [0] * 8 + [1] * 1, None),  # the first two left the window
        (10, 0.3, [1, 1] + [0] * 7 + [1], 10),  # ... unless the 3rd comes in time
        (100, 0.2, [1] * 19, None),  # a short stream needs as many flags as a full window
        (100, 0.2, [1] * 20, 20),
        (3, 0.5, [0, 0, 1, 1], 4),  # ceil(1.5) = 2
        (1, 0.5, [0, 1], 2),
    ],
)
def test_fires_exactly_when_enough_recent_images_are_flagged(
    window: int, share: float, flags: list[int], fires_at: int | None
) -> None:
    alarm = RejectedShareAlarm(window=window, share=share)
    verdict = alarm.observe(np.asarray(flags, dtype=bool))
    assert alarm.first_alarm_at == fires_at
    assert verdict.flagged is (fires_at is not None)
    assert alarm.queries_seen == len(flags) and alarm.flagged_total == sum(flags)
    assert alarm.recent_flagged == sum(flags[-window:])
    assert verdict.statistic == sum(flags[-window:]) / window and verdict.threshold == share


def test_batches_and_single_images_give_the_same_alarm() -> None:
    flags = np.random.default_rng(0).random(500) < 0.15
    whole, piecewise = (
        RejectedShareAlarm(window=50, share=0.3),
        RejectedShareAlarm(window=50, share=0.3),
    )
    whole.observe(flags)
    for start in range(0, 500, 7):
        piecewise.observe(flags[start : start + 7])
    assert whole.first_alarm_at == piecewise.first_alarm_at
    assert (whole.recent_flagged, whole.flagged_total) == (
        piecewise.recent_flagged,
        piecewise.flagged_total,
    )


def test_the_first_alarm_is_kept_once_the_share_falls_again() -> None:
    alarm = RejectedShareAlarm(window=4, share=0.5)
    alarm.observe([True, True, False, False, False, False])
    assert alarm.first_alarm_at == 2 and alarm.recent_flagged == 0
    assert alarm.verdict.flagged


def test_defaults_leave_a_normal_client_alone() -> None:
    """At the detector's default 98% pass rate a normal image is flagged with p = 0.02; the
    default alarm (20 of the last 100) then fires on a full window with probability < 1e-13."""
    alarm = RejectedShareAlarm()
    assert (alarm.window, alarm.needed) == (100, 20)
    assert binom.sf(alarm.needed - 1, alarm.window, 0.02) < 1e-13


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"window": 0}, "window must be in 1..1000000, got 0"),
        ({"window": 2.5}, "window must be an integer, got 2.5"),
        ({"share": 0.0}, r"share must be a number in \(0, 1\), got 0.0"),
        ({"share": 1.0}, r"share must be a number in \(0, 1\), got 1.0"),
        ({"share": "0.2"}, r"share must be a number in \(0, 1\), got '0.2'"),
    ],
)
def test_bad_settings_name_the_value(settings: dict, message: str) -> None:
    with pytest.raises(DetectorError, match=message):
        RejectedShareAlarm(**settings)
