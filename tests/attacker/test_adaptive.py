"""The adaptive attacker (seed 001, item 5) against a LocalOracle: its twin is the substitute
self-sanitised on the labels it bought, and its examples fool the substitute about as often as
plain PGD's while keeping KL(substitute || twin) far lower. Tiny models, seeded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from attacker.adaptive import (
    MIN_TWIN_IMAGES,
    Twin,
    adaptive_transfer,
    build_twin,
    buy_twin_labels,
    twin_divergence,
)
from attacker.extraction import train_substitute
from attacker.oracle import LocalOracle
from attacker.transfer import transfer_attack
from mlcore.adversarial import IGSM, PGD
from mlcore.architectures import build_model
from mlcore.checkpoints import Checkpoint
from mlcore.datasets import ImageDataset, load_dataset
from mlcore.divergences import label_log_confidence
from mlcore.training import fit, predict_logits, seed_everything

TWIN_THRESHOLD = 0.99  # a 10-epoch substitute is rarely surer than that on its own images


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def test_set() -> ImageDataset:
    return load_dataset("mnist-embedded:test")


@pytest.fixture(scope="module")
def oracle() -> LocalOracle:
    """The target: a LeNet-5 on the embedded target-train split, 3 epochs."""
    train = load_dataset("mnist-embedded:target-train")
    seed_everything(0)
    return LocalOracle(
        fit(build_model("lenet5"), train.images, train.labels, epochs=3, batch_size=32, seed=0)
    )


@pytest.fixture(scope="module")
def bought(oracle: LocalOracle) -> tuple[torch.Tensor, np.ndarray, np.ndarray, dict[str, int]]:
    """300 random pool images with the target's labels: (images, labels, pool indices, cost)."""
    pool = load_dataset("mnist-embedded:pool")
    indices = np.sort(np.random.default_rng(0).choice(len(pool), 300, replace=False))
    images, labels, cost = buy_twin_labels(oracle, pool, indices)
    return images, labels, indices, cost


@pytest.fixture(scope="module")
def substitute(bought: tuple[torch.Tensor, np.ndarray, np.ndarray, dict[str, int]]) -> Checkpoint:
    pool = load_dataset("mnist-embedded:pool")
    model, arch_kwargs, _ = train_substitute(
        pool, bought[2], bought[1], epochs=10, batch_size=16, seed=0
    )
    return Checkpoint(model, "lenet5", arch_kwargs, "mnist-embedded:pool")


@pytest.fixture(scope="module")
def twin(
    substitute: Checkpoint, bought: tuple[torch.Tensor, np.ndarray, np.ndarray, dict[str, int]]
) -> Twin:
    images, labels, _, _ = bought
    return build_twin(
        substitute, images, labels, threshold=TWIN_THRESHOLD, epochs=10, batch_size=16
    )


def test_the_twin_labels_are_bought_once_each(
    bought: tuple[torch.Tensor, np.ndarray, np.ndarray, dict[str, int]],
) -> None:
    images, labels, _, cost = bought
    assert len(images) == len(labels) == 300 and cost["queries_paid"] == 300


def test_the_twin_keeps_exactly_the_images_the_substitute_is_sure_of(
    substitute: Checkpoint,
    twin: Twin,
    bought: tuple[torch.Tensor, np.ndarray, np.ndarray, dict[str, int]],
) -> None:
    images, labels, _, _ = bought
    log_confidence = label_log_confidence(predict_logits(substitute.model, images), labels)
    expected = np.flatnonzero(log_confidence >= np.log(TWIN_THRESHOLD))
    assert twin.kept.tolist() == expected.tolist()
    assert MIN_TWIN_IMAGES <= len(twin.kept) < 300  # a real subset
    assert twin.describe() == {
        "twin_threshold": TWIN_THRESHOLD, "twin_bought": 300, "twin_kept": len(expected),
        "twin_epochs": 10,
    }  # fmt: skip


def test_a_threshold_that_keeps_too_few_images_is_named(
    substitute: Checkpoint, bought: tuple[torch.Tensor, np.ndarray, np.ndarray, dict[str, int]]
) -> None:
    images, labels, _, _ = bought
    with pytest.raises(ValueError, match=r"twin threshold 0.9999999999 keeps \d+ of 300"):
        build_twin(substitute, images, labels, threshold=0.9999999999, epochs=1)


def test_adaptive_examples_keep_kl_low_at_the_same_success_on_the_substitute(
    oracle: LocalOracle, substitute: Checkpoint, twin: Twin, test_set: ImageDataset
) -> None:
    """Same seeds, same PGD, same seed: plain against adaptive (KL weight 1). Measured: plain
    mean KL(substitute || twin) 0.29, adaptive 0.07, substitute success 98.9% and 97.8%. The
    test asks for under half the KL with success within 5 points."""
    attack = PGD(eps=0.5, steps=20)
    common = dict(targeted=True, seeds=10, noise_baseline=False)
    plain = transfer_attack(oracle, substitute.model, test_set, attack=attack, **common)
    sent = plain.crafted.adversarial[plain.sent_index]
    plain_kl = twin_divergence(substitute.model, twin.model, sent).mean()
    plain_summary = plain.summary()

    paid_before = oracle.meter.paid
    summary = adaptive_transfer(
        oracle, substitute.model, twin, test_set, attack=attack, kl_weight=1.0, **common
    )
    adaptive = summary["adaptive"]
    assert summary["attack"] == "PGD+KL" and summary["kl_weight"] == 1.0
    assert summary["seed_indices"] == plain_summary["seed_indices"]
    assert summary["substitute_success"] >= plain_summary["substitute_success"] - 0.05
    assert adaptive["mean_kl_sent"] < 0.5 * plain_kl, (plain_kl, adaptive["mean_kl_sent"])
    # What it sent and what the target answered are counted as for any transfer step.
    assert oracle.meter.paid - paid_before == summary["sent"] == summary["queries_paid"]
    assert adaptive["passed_and_fooled_target"] == summary["fooled_target"]
    assert adaptive["normal_images"] == len(test_set)
    assert 0 <= adaptive["sent_under_own_threshold"] <= summary["sent"]


def test_the_adaptive_attack_extends_plain_pgd_only(
    oracle: LocalOracle, substitute: Checkpoint, twin: Twin, test_set: ImageDataset
) -> None:
    with pytest.raises(ValueError, match="the adaptive attack extends PGD, got IGSM"):
        adaptive_transfer(
            oracle, substitute.model, twin, test_set, attack=IGSM(), kl_weight=1.0,
            targeted=False, seeds=2,
        )  # fmt: skip


def test_cli_adaptive_reports_the_twin_and_reuses_the_cached_labels(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`attacker transfer --adaptive` against the scripted service: the twin's labels come
    from the answer cache the extraction filled, and transfer.json has the adaptive section."""
    import json

    from typer.testing import CliRunner

    from attacker.cli import app
    from tests.attacker.fakes import FakeService, route_http_to

    service = FakeService()
    route_http_to(service, monkeypatch)
    cache = str(tmp_path / "c.sqlite3")

    def invoke(*args: str) -> None:
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == 0, result.output

    common = ["--url", "http://target", "--api-key", "k", "--cache", cache]
    invoke("select", "--method", "random", "--k", "40", "-o", str(tmp_path / "s.json"))
    invoke(
        "extract", *common, "--selection", str(tmp_path / "s.json"), "--epochs", "3",
        "-o", str(tmp_path / "sub.pt"),
    )  # fmt: skip
    assert service.used == 40
    invoke(
        "transfer", *common, "--substitute", str(tmp_path / "sub.pt"), "--adaptive",
        "--selection", str(tmp_path / "s.json"), "--twin-threshold", "0.2", "--twin-epochs", "1",
        "--seeds", "2", "--steps", "2", "--send-all", "--no-noise-baseline",
        "--report-dir", str(tmp_path / "r"),
    )  # fmt: skip
    report = json.loads((tmp_path / "r" / "transfer.json").read_text())
    assert report["attack"] == "PGD+KL"
    assert report["adaptive"]["twin_queries"]["queries_from_cache"] == 40
    assert report["adaptive"]["twin_queries"]["queries_paid"] == 0
    assert report["adaptive"]["twin_bought"] == 40 and report["adaptive"]["twin_threshold"] == 0.2
    assert service.used == 40 + report["sent"]
    assert "Adaptive attack" in (tmp_path / "r" / "transfer.md").read_text()
