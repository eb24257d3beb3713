"""The sanitised pair behind an input defence, for real (``defenses.sanitization``): built at
first start when missing (logged), refused at start-up when missing, built for other settings or
for another parent checkpoint (sha256), naming why."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from mlcore.checkpoints import load_checkpoint, save_checkpoint
from mlcore.datasets import load_dataset
from target_service.app import create_app
from target_service.screening import InputDefenceError, sanitized_pair_path
from target_service.settings import Settings
from tests.target_service.test_api import ADMIN, ADMIN_HEADERS, MODEL, bearer, payload

# the session's parent trained one epoch: a low sanitisation threshold keeps enough images
SPEC = {
    "kind": "kl-sanitized",
    "mode": "framework",
    "method": "self",
    "threshold": 0.5,
    "pass_rate": 0.9,
    "epochs": 1,
}


def make_app(state_dir: Path, checkpoint_dir: Path, **overrides: Any) -> TestClient:
    settings = {"train_missing": False, "detectors": {MODEL: {}}, **overrides}
    return TestClient(
        create_app(
            Settings(
                admin_token=ADMIN,
                state_dir=state_dir,
                checkpoint_dir=checkpoint_dir,
                models=[MODEL],
                **settings,
            )
        )
    )


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def first_start(
    tmp_path_factory: pytest.TempPathFactory, trained_checkpoints: Path
) -> Iterator[tuple[Path, list[str], dict[str, Any]]]:
    """A checkpoint folder without a pair, served once with TARGET_TRAIN_MISSING: the folder
    afterwards, what the service logged, and a framework answer to 100 test images."""
    folder = tmp_path_factory.mktemp("first-start")
    shutil.copy(trained_checkpoints / f"{MODEL}.pt", folder)
    records = Records()
    logger = logging.getLogger("target_service.screening")
    logger.addHandler(records)
    try:
        with make_app(
            tmp_path_factory.mktemp("state"),
            folder,
            train_missing=True,
            max_batch=100,
            input_defenses={MODEL: SPEC},
        ) as http:
            key = http.post(
                "/v1/admin/clients", json={"name": "n", "budget": 100}, headers=ADMIN_HEADERS
            ).json()["api_key"]
            x = load_dataset("mnist-embedded:test").images[:100].numpy()
            answer = http.post(
                f"/v1/models/{MODEL}/predict", json=payload(x), headers=bearer(key)
            ).json()
    finally:
        logger.removeHandler(records)
    yield folder, records.messages, answer


def start(folder: Path, tmp_path: Path, **spec: Any) -> None:
    with make_app(tmp_path / "state", folder, input_defenses={MODEL: {**SPEC, **spec}}):
        pass


def test_first_start_builds_the_missing_pair_beside_the_checkpoint_and_logs_it(
    first_start: tuple[Path, list[str], dict[str, Any]],
) -> None:
    folder, messages, answer = first_start
    pair_file = sanitized_pair_path(folder, MODEL, "self")
    assert pair_file == folder / "lenet5-mnist.sanitized-self.pt" and pair_file.is_file()
    assert any("there is no sanitised model" in m and "building it now" in m for m in messages)
    provenance = load_checkpoint(pair_file).provenance
    assert (provenance["method"], provenance["threshold"], provenance["pass_rate"]) == (
        "self",
        0.5,
        0.9,
    )
    # framework: null exactly at the rejected indices; pass rate 0.9 rejects a few normal images
    rejected = answer["rejected"]
    assert [i for i, label in enumerate(answer["labels"]) if label is None] == rejected
    assert answer["charged"] == 100 and len(rejected) < 40


def test_the_stored_pair_is_used_as_it_is(
    first_start: tuple[Path, list[str], dict[str, Any]], tmp_path: Path
) -> None:
    folder, _, _ = first_start
    before = sanitized_pair_path(folder, MODEL, "self").stat().st_mtime_ns
    start(folder, tmp_path)  # TARGET_TRAIN_MISSING false: it must load, not build
    assert sanitized_pair_path(folder, MODEL, "self").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"threshold": 0.6}, "built with threshold 0.5 (configured 0.6)"),
        ({"pass_rate": 0.95}, "built with pass_rate 0.9 (configured 0.95)"),
        ({"kind": "js-sanitized"}, "built with score 'kl' (configured 'js')"),
        ({"method": "canonical"}, "there is no sanitised model at"),
    ],
)
def test_a_pair_for_other_settings_stops_the_start_naming_why(
    first_start: tuple[Path, list[str], dict[str, Any]],
    tmp_path: Path,
    spec: dict[str, Any],
    message: str,
) -> None:
    with pytest.raises(InputDefenceError) as info:
        start(first_start[0], tmp_path, **spec)
    assert str(info.value).startswith("TARGET_INPUT_DEFENSES['lenet5-mnist']: ")
    assert message in str(info.value) and "target-service train" in str(info.value)


def test_a_pair_built_for_another_parent_checkpoint_is_refused(
    first_start: tuple[Path, list[str], dict[str, Any]], tmp_path: Path
) -> None:
    folder = tmp_path / "retrained"
    shutil.copytree(first_start[0], folder)
    parent = load_checkpoint(folder / f"{MODEL}.pt")
    with torch.no_grad():  # another parent: same architecture, other weights
        next(parent.model.parameters()).add_(0.01)
    save_checkpoint(
        folder / f"{MODEL}.pt",
        parent.model,
        arch=parent.arch,
        arch_kwargs=parent.arch_kwargs,
        dataset=parent.dataset,
        metrics=parent.metrics,
    )
    with pytest.raises(InputDefenceError, match="sha256") as info:
        start(folder, tmp_path)
    assert "lenet5-mnist.sanitized-self.pt" in str(info.value)
