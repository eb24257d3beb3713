"""A per-client token bucket: ``rate`` requests per second with bursts up to ``burst``."""

from __future__ import annotations

import threading
import time

from target_service.errors import RateLimited


class RateLimiter:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill)
        self._lock = threading.Lock()

    def check(self, client_id: str) -> None:
        """Take one token or raise RateLimited; a rate of 0 means unlimited."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[client_id] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise RateLimited(f"more than {self.rate:g} requests/s; retry in {wait:.2f} s")
            self._buckets[client_id] = (tokens - 1.0, now)
