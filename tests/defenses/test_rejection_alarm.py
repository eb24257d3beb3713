"""The flagged-share alarm of an input defence: fires exactly when ceil(share x window) of the
last ``window`` images are flagged, forgets images that left the window, never fires on a few."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from defenses.base import DetectorError
from defenses.rejection_alarm import RejectedShareAlarm, share_for_pass_rate


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


@pytest.mark.parametrize(
    ("pass_rate", "window", "needed"),
    [(0.98, 100, 12), (0.95, 100, 19), (0.90, 100, 28), (0.90, 20, 11), (0.5, 20, 20)],
)
def test_the_default_share_leaves_a_normal_client_alone(
    pass_rate: float, window: int, needed: int
) -> None:
    """A normal client, each image flagged with p = 1 - pass_rate, reaches ``needed`` flagged
    images in one window with probability <= 1e-6, and ``needed - 1`` with more."""
    share = share_for_pass_rate(pass_rate, window=window)
    alarm = RejectedShareAlarm(window=window, share=share)
    assert (share, alarm.needed) == (needed / window, needed)
    assert binom.sf(needed - 1, window, 1 - pass_rate) <= 1e-6
    if needed < window:
        assert binom.sf(needed - 2, window, 1 - pass_rate) > 1e-6


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"window": 0, "share": 0.2}, "window must be in 1..1000000, got 0"),
        ({"window": 2.5, "share": 0.2}, "window must be an integer, got 2.5"),
        ({"share": 0.0}, r"share must be a number in \(0, 1\], got 0.0"),
        ({"share": 1.5}, r"share must be a number in \(0, 1\], got 1.5"),
        ({"share": "0.2"}, r"share must be a number in \(0, 1\], got '0.2'"),
    ],
)
def test_bad_settings_name_the_value(settings: dict, message: str) -> None:
    with pytest.raises(DetectorError, match=message):
        RejectedShareAlarm(**settings)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"pass_rate": 1.0}, r"pass_rate must be a number in \(0, 1\), got 1.0"),
        ({"pass_rate": 0.9, "window": 0}, "window must be in 1..1000000, got 0"),
        ({"pass_rate": 0.9, "false_alarm": 0}, r"false_alarm must be a number in \(0, 1\), got 0"),
    ],
)
def test_share_for_pass_rate_names_a_bad_value(arguments: dict, message: str) -> None:
    with pytest.raises(DetectorError, match=message):
        share_for_pass_rate(**arguments)
