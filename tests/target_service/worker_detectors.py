"""A detector kind for the detection-worker tests, and a launcher that registers it in a real
``target-service`` process (``python -m tests.target_service.worker_detectors detect ...``).

``digest`` keeps an order-sensitive SHA-256 chain over every image and label it observed, so its
state tells whether a stream's queries were each seen exactly once and in order; it sleeps
``delay`` seconds per batch (a worker can be killed mid-stream), and with ``busy_dir`` it marks
the stream it is observing (named by the first pixel of its images, which the tests make
distinct per stream) with an exclusive file, leaving ``overlap-<stream>`` when two processes
observe one stream at once.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from defenses.base import DETECTORS, DetectorBase

KIND = "digest"
REGISTRATION = f"{__name__}:DigestDetector"


class DigestDetector(DetectorBase):
    name: ClassVar[str] = KIND

    def __init__(self, *, delay: float = 0.0, busy_dir: str = "") -> None:
        super().__init__(threshold=0.0)
        self.delay, self.busy_dir = float(delay), busy_dir
        self.digest = ""

    def _observe(self, x: Tensor, labels: Tensor) -> None:
        marker = None
        # The hub's warm-up feeds each worker's throwaway copy two float blank images at start-up:
        # they belong to no stream, so only logged (uint8) queries mark one busy.
        if self.busy_dir and x.dtype == torch.uint8:
            tag = int(x[0].flatten()[0])
            marker = Path(self.busy_dir) / f"busy-{tag}"
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                (Path(self.busy_dir) / f"overlap-{tag}").touch()
                marker = None
        chain = hashlib.sha256(self.digest.encode())
        chain.update(x.contiguous().numpy().tobytes())
        chain.update(labels.numpy().tobytes())
        self.digest = chain.hexdigest()
        self.queries_seen += len(x)
        time.sleep(self.delay)
        if marker is not None:
            marker.unlink()

    def state_dict(self) -> dict:
        return {**self._base_state(), "digest": self.digest}

    def load_state_dict(self, state: dict) -> None:
        self._load_base_state(state)
        self.digest = str(state["digest"])


def register() -> None:
    DETECTORS[KIND] = REGISTRATION


if __name__ == "__main__":
    register()
    from target_service.cli import app

    app()
