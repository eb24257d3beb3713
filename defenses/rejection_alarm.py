"""The per-client alarm of a per-query input defence: too many flagged images, too recently.

An input defence (the sanitised twin of "Less is More", seed 001) judges each image on its own;
an attacker probing it sends many suspicious images, a normal client a few (at a 98% normal pass
rate, about 2 in 100). ``RejectedShareAlarm`` watches one client's stream of per-image flags and
fires once at least ``share`` of the slots of its last ``window`` images are flagged, that is once
``ceil(share * window)`` of its last ``window`` images were flagged (a client with fewer images
than ``window`` needs as many flagged ones: a handful of images never fires it).

The default share comes from the defence's normal pass rate (``share_for_pass_rate``): the
smallest count a normal client, whose images are each flagged with probability 1 - pass rate,
reaches within one window with probability at most 1e-6 (binomial tail). Window 100: 12 flagged
at a 98% pass rate, 19 at 95%, 28 at 90%. An attacker whose examples are mostly flagged fires
it within a few dozen of them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

from scipy.stats import binom

from defenses.base import DetectorError, Verdict, check_fraction, check_int

__all__ = [
    "DEFAULT_ALARM_WINDOW",
    "NORMAL_FALSE_ALARM",
    "RejectedShareAlarm",
    "share_for_pass_rate",
]

DEFAULT_ALARM_WINDOW = 100
NORMAL_FALSE_ALARM = 1e-6  # chance that one window of a normal client's images fires the alarm


def share_for_pass_rate(
    pass_rate: float, *, window: int = DEFAULT_ALARM_WINDOW, false_alarm: float = NORMAL_FALSE_ALARM
) -> float:
    """The alarm share for a defence that lets ``pass_rate`` of normal images through: a window
    of a normal client's images (flagged independently) fires it with probability at most
    ``false_alarm``."""
    flagged = 1.0 - check_fraction("pass_rate", pass_rate)
    window = check_int("window", window, low=1, high=1_000_000)
    check_fraction("false_alarm", false_alarm)
    needed = min(window, int(binom.isf(false_alarm, window, flagged)) + 1)
    return needed / window


class RejectedShareAlarm:
    """One client's flagged-share alarm (see the module docstring). Not thread-safe: feed one
    client's images in the order they were charged."""

    def __init__(self, *, window: int = DEFAULT_ALARM_WINDOW, share: float) -> None:
        self.window = check_int("window", window, low=1, high=1_000_000)
        if (
            isinstance(share, bool)
            or not isinstance(share, int | float)
            or not 0.0 < share <= 1.0  # also refuses NaN
        ):
            raise DetectorError(f"share must be a number in (0, 1], got {share!r}")
        self.share = float(share)
        self.needed = max(1, math.ceil(self.share * self.window - 1e-9))
        self.queries_seen = 0
        self.flagged_total = 0
        self.first_alarm_at: int | None = None  # 1-based index of the image it first fired on
        self._recent: deque[bool] = deque(maxlen=self.window)
        self._recent_flagged = 0

    @property
    def recent_flagged(self) -> int:
        """Flagged images among the last ``window``."""
        return self._recent_flagged

    @property
    def verdict(self) -> Verdict:
        """statistic: the flagged share of the last ``window`` slots; threshold: ``share``."""
        return Verdict(
            flagged=self.first_alarm_at is not None,
            statistic=self._recent_flagged / self.window,
            threshold=self.share,
        )

    def observe(self, flags: Iterable[bool]) -> Verdict:
        """Feed one batch of per-image flags, in order; returns the verdict after it."""
        for flag in flags:
            if len(self._recent) == self.window:
                self._recent_flagged -= self._recent[0]
            flag = bool(flag)
            self._recent.append(flag)
            self._recent_flagged += flag
            self.flagged_total += flag
            self.queries_seen += 1
            if self.first_alarm_at is None and self._recent_flagged >= self.needed:
                self.first_alarm_at = self.queries_seen
        return self.verdict
