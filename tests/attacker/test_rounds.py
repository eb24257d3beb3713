"""Adaptive strategies (attacker/selection/rounds.py and friends): the Knockoff bandit learns
which classes pay, ActiveThief's criteria pick what they claim, every round is bought through
the metered HTTP oracle for exactly k labels, a 402 mid-round keeps what was bought, and every
bad option fails with exit 2 before a label is bought."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import httpx2
import numpy as np
import pytest
import torch
from scipy.stats import entropy
from typer.testing import CliRunner

from attacker.cli import app
from attacker.oracle import Meter
from attacker.selection import SELECTORS, SelectionResult, Selector
from attacker.selection.activethief import ActiveThief, k_center_greedy
from attacker.selection.class_probability import HcpSelector
from attacker.selection.guides import probabilities_from_model
from attacker.selection.knockoff import GradientBandit, KnockoffAdaptive, KnockoffRandomSelector
from attacker.selection.online import GuidedRounds, select_with_target_guide
from attacker.selection.rounds import RoundState, run_rounds
from mlcore.checkpoints import load_checkpoint
from mlcore.datasets import ImageDataset
from tests.attacker.fakes import FakeService, route_http_to

URL = "http://target"


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


class ListingService(FakeService):
    """FakeService that also answers ``GET /v1/models`` with one model and its output policy."""

    def __init__(self, *, output_policy: str = "label-only", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.output_policy = output_policy

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        if request.method == "GET" and request.url.path == "/v1/models":
            card = {"name": "lenet5-mnist", "output_policy": self.output_policy}
            return httpx2.Response(200, json={"models": [card]})
        response = super().__call__(request)
        if response.status_code == 200 and self.output_policy.startswith("probabilities"):
            answer = response.json()  # one-hot probabilities of the scripted labels
            answer["probabilities"] = np.eye(10)[answer["labels"]].tolist()
            return httpx2.Response(200, json=answer)
        return response


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch) -> ListingService:
    fake = ListingService()
    route_http_to(fake, monkeypatch)
    return fake


def synthetic_pool(per_class: int = 30, classes: int = 10) -> ImageDataset:
    """Tiny 1x28x28 images whose first pixel is their class (the oracles below read it)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(per_class * classes, 1, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(classes), per_class)
    images[:, 0, 0, 0] = labels
    return ImageDataset("synthetic", torch.from_numpy(images), torch.from_numpy(labels), classes)


class DiverseOnClassThree:
    """Answers 0 to every image except those of pool class 3, which get varied labels: only
    class 3 earns Knockoff's diversity reward."""

    def __init__(self) -> None:
        self.meter, self.queries_remaining = Meter(), None
        self.rng = np.random.default_rng(1)

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        self.meter.paid += len(images)
        first = images.reshape(len(images), -1)[:, 0]
        return np.where(first == 3, self.rng.integers(1, 10, size=len(images)), 0)


def test_the_gradient_bandit_moves_its_policy_toward_the_rewarding_action() -> None:
    bandit = GradientBandit(5, lr=0.1, rng=np.random.default_rng(0))
    assert np.allclose(bandit.policy(), 0.2)
    for _ in range(300):
        action = bandit.sample()
        bandit.update(action, 1.0 if action == 3 else 0.0)
    policy = bandit.policy()
    assert policy.argmax() == 3 and policy[3] > 0.6  # from 0.2


def test_knockoff_adaptive_prefers_the_class_whose_answers_are_diverse() -> None:
    """On a synthetic oracle only class 3 earns the diversity reward; the class policy moves
    from uniform (0.1) toward it, and the bandit buys more of it than a uniform policy would."""
    strategy = KnockoffAdaptive(rounds=10, reward="diversity", lr=0.5, seed=0)
    pool = synthetic_pool(per_class=60)
    result = run_rounds(
        strategy, DiverseOnClassThree(), pool, k=200, epochs=1, round_epochs=1, batch_size=32
    )
    policy = np.array(result.strategy["class_policy_by_round"])
    assert policy[-1].argmax() == 3 and policy[-1][3] > 0.3
    bought_classes = pool.labels.numpy()[result.indices]
    assert (bought_classes == 3).sum() > 200 / 10 * 1.5  # uniform would buy about 20
    assert result.queries_bought == 200 and len(np.unique(result.indices)) == 200


def test_activethief_rounds_score_the_pool_with_the_retrained_substitute() -> None:
    """Entropy picks the images the substitute is least sure of; k-center the farthest."""
    pool = synthetic_pool(per_class=3)
    substitute = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    state = RoundState(
        pool, np.arange(5), np.zeros(5, np.int64), substitute, np.random.default_rng()
    )
    chosen = ActiveThief(criterion="entropy").choose(state, 4)
    scores = entropy(probabilities_from_model(substitute, pool.images), axis=1)
    left = np.arange(5, len(pool))
    assert set(chosen) == set(left[np.argsort(-scores[left])[:4]])

    points = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [5.1, 0.0], [-3.0, 0.0]])
    assert k_center_greedy(points, np.array([[0.0, 0.0]]), 3).tolist() == [3, 4, 1]


def test_knockoff_random_is_a_uniform_seeded_sample_blind_to_classes() -> None:
    pool = synthetic_pool()
    images, labels = pool.images.numpy(), pool.labels.numpy()
    first = KnockoffRandomSelector(seed=3)(images, labels, k=50)
    assert len(set(first.indices.tolist())) == 50
    assert first.indices.tolist() == KnockoffRandomSelector(seed=3)(images, labels, k=50).indices.tolist()  # fmt: skip
    assert sum(info["k"] for info in first.per_class.values()) == 50


def run_online(folder: Path, *args: str) -> dict:
    code, output = invoke(
        "run", "--url", URL, "--api-key", "k", "--epochs", "1", "--round-epochs", "1",
        "--batch-size", "32", "--no-transfer", "--report-dir", str(folder),
        "--cache", str(folder / "cache.sqlite3"), *args,
    )  # fmt: skip
    assert code == 0, output
    return json.loads((folder / "report.json").read_text())


@pytest.mark.parametrize(
    "method", ["knockoff-adaptive", "activethief-entropy", "activethief-kcenter"]
)
def test_an_adaptive_method_over_http_is_charged_exactly_its_budget(
    service: ListingService, tmp_path: Path, method: str
) -> None:
    report = run_online(tmp_path, "--method", method, "--k", "60", "--rounds", "4")
    assert service.used == 60 == report["queries_paid"] == report["queries_bought"]
    assert report["stopped_by"] is None
    sizes = [record["bought"] for record in report["rounds"]]
    assert sum(sizes) == 60 and len(sizes) == (4 if method == "knockoff-adaptive" else 5)
    assert len(service.requests) == len(sizes)  # one purchase per round


@pytest.mark.parametrize(
    ("refusal", "stopped_by", "last_round", "bought"),
    [
        # rounds of 15: the fourth is refused (402), then the 5 left of the budget are spent
        ({"budget": 50}, "budget", {"round": 4, "planned": 15, "bought": 5}, 50),
        # a detector blocks the client after 40 charged queries: the fourth round gets a 403
        ({"block_after": 40}, "blocked", {"round": 4, "planned": 15, "bought": 0}, 45),
    ],
    ids=["402", "403"],
)
def test_a_refusal_in_the_middle_of_the_rounds_keeps_what_was_bought(
    service: ListingService,
    tmp_path: Path,
    refusal: dict[str, int],
    stopped_by: str,
    last_round: dict[str, int],
    bought: int,
) -> None:
    for name, value in refusal.items():
        setattr(service, name, value)
    report = run_online(tmp_path, "--method", "knockoff-adaptive", "--k", "60", "--rounds", "4")
    assert report["stopped_by"] == stopped_by
    assert report["rounds"][-1] == last_round
    assert report["queries_bought"] == report["queries_paid"] == bought == service.used
    assert (tmp_path / "substitute-knockoff-adaptive-k60.pt").exists()


class MostConfident(Selector):
    """A test-only guided selector: the k images whose own class is most probable."""

    guide: ClassVar = "probabilities"

    @property
    def params(self) -> dict[str, Any]:
        return {}

    def run(
        self, images: np.ndarray, labels: np.ndarray, *, k: int, guide: np.ndarray | None
    ) -> SelectionResult:
        assert guide is not None
        order = np.argsort(-guide[np.arange(len(labels)), labels], kind="stable")
        return SelectionResult(indices=np.sort(order[:k]), per_class={})


@pytest.fixture
def guided(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(SELECTORS, "most-confident", MostConfident)
    monkeypatch.setattr(MostConfident, "__init__", lambda self, **_: None)
    return "most-confident"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "knockoff-bogus"], "unknown method 'knockoff-bogus'"),
        (
            ["--method", "knockoff-adaptive", "--k", "1501"],
            "--k for knockoff-adaptive must be in 1..1500 (the pool size), got 1501",
        ),
        (
            ["--method", "knockoff-adaptive", "--k", "5", "--rounds", "10"],
            "rounds=10 cannot fit the budget: k=5 leaves 5 labels",
        ),
        (
            ["--method", "activethief-entropy", "--k", "20", "--rounds", "19"],
            "rounds=19 cannot fit the budget: k=20 after a seed of 2 leaves 18 labels",
        ),
        (["--method", "activethief-kcenter", "--seed-fraction", "0"], "seed_fraction must be > 0"),
        (
            ["--method", "activethief-kcenter", "--seed-fraction", "1.5"],
            "seed_fraction must be in [0, 1), got 1.5",
        ),
        (
            ["--method", "knockoff-adaptive", "--rounds", "0"],
            "rounds must be an integer >= 1, got 0",
        ),
        (
            ["--method", "{guided}", "--seed-fraction", "0"],
            "most-confident needs probabilities and the target answers labels only: give it a seed budget (--seed-fraction > 0), got --seed-fraction 0.0",
        ),
        (
            ["--method", "{guided}", "--seed-fraction", "0.99", "--k", "50"],
            "--seed-fraction 0.99 leaves no labels for most-confident to choose at k=50",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_online_methods_fail_on_bad_input_before_a_label_is_bought(
    service: ListingService, guided: str, tmp_path: Path, args: list[str], message: str
) -> None:
    args = [arg.replace("{guided}", guided) for arg in args]
    code, output = invoke(
        "run", "--url", URL, "--api-key", "k", "--no-transfer", "--report-dir", str(tmp_path), *args
    )
    assert code == 2, output
    assert message in output
    assert service.used == 0 and all("inputs" not in body for body in service.requests)


def test_select_and_extract_say_where_each_method_runs(
    service: ListingService, tmp_path: Path
) -> None:
    code, output = invoke("select", "--method", "knockoff-adaptive", "-o", str(tmp_path / "s.json"))
    assert code == 2 and "buys its labels in rounds from the target: use `attacker run`" in output
    code, output = invoke(
        "extract",
        "--url",
        URL,
        "--api-key",
        "k",
        "--method",
        "random",
        "-o",
        str(tmp_path / "s.pt"),
    )
    assert code == 2 and "--method random is not an online method" in output
    assert service.requests == []


def test_a_guided_selector_online_against_a_label_only_target_buys_a_seed_round_first(
    service: ListingService, guided: str, tmp_path: Path
) -> None:
    """Label-only target: a random seed round trains the attacker's model, whose probabilities
    guide the selector over the rest of the pool; k labels in all, and the report says so."""
    report = run_online(tmp_path, "--method", guided, "--k", "40", "--seed-fraction", "0.25")
    assert report["guide_source"] == "seed-model"
    assert [record["bought"] for record in report["rounds"]] == [10, 30]
    notes = (tmp_path / "report.md").read_text()
    assert "labels bought per round 10, 30" in notes
    assert "guide from the attacker's own model, trained on a random seed round" in notes
    assert service.used == 40 == report["queries_paid"] == report["queries_bought"]


def test_a_guided_selector_against_a_probability_target_pays_for_the_whole_pool(
    service: ListingService, guided: str, tmp_path: Path
) -> None:
    """The target returns probabilities: the pool (1,500 images) is sent once for the guide,
    every one of those queries is paid and reported, and nothing is bought twice."""
    service.output_policy = "probabilities:4"
    report = run_online(tmp_path, "--method", guided, "--k", "20")
    assert report["guide_source"] == "target"
    assert report["queries_paid"] == 1500 == service.used
    assert report["queries_bought"] == 20 and report["rounds"] == []
    assert (
        "guide from the target's probabilities of the whole pool"
        in (tmp_path / "report.md").read_text()
    )


class ProbabilityOracle:
    """Answers probabilities that favour each image's first pixel's class, one query each."""

    def __init__(self) -> None:
        self.meter, self.queries_remaining = Meter(), None

    def predict_probabilities(self, images: np.ndarray) -> np.ndarray:
        self.meter.paid += len(images)
        rng = np.random.default_rng(2)
        scores = rng.random((len(images), 10))
        scores[np.arange(len(images)), images.reshape(len(images), -1)[:, 0] % 10] += 1.0
        return scores / scores.sum(axis=1, keepdims=True)


def test_the_target_guide_pays_one_query_per_pool_image_and_labels_by_its_argmax() -> None:
    pool = synthetic_pool(per_class=5)
    oracle = ProbabilityOracle()
    images, labels = pool.images.numpy(), pool.labels.numpy()
    chosen, bought = select_with_target_guide(oracle, images, labels, HcpSelector(), k=20)
    assert oracle.meter.paid == len(pool)  # the guide is the target's answers on the whole pool
    assert len(set(chosen.tolist())) == 20 and (bought == labels[chosen]).all()


def test_guided_rounds_choose_the_rest_from_the_unbought_pool_with_the_real_hcp() -> None:
    pool = synthetic_pool(per_class=10)
    oracle = DiverseOnClassThree()
    strategy = GuidedRounds("hcp", HcpSelector(), seed_fraction=0.2, seed=0)
    result = run_rounds(strategy, oracle, pool, k=50, epochs=1, round_epochs=1, batch_size=32)
    assert [record["bought"] for record in result.rounds] == [10, 40]
    assert oracle.meter.paid == 50 == len(set(result.indices.tolist()))
    assert result.strategy["guide_source"] == "seed-model"


def test_extract_runs_an_online_method_for_exactly_k_labels(
    service: ListingService, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "substitute.pt"
    common = ["extract", "--url", URL, "--api-key", "k", "--cache", str(tmp_path / "c.sqlite3")]
    code, output = invoke(*common, "--method", "activethief-kcenter", "--k", "1501")
    assert code == 2 and "--k must be in 1..1500 (the pool size), got 1501" in output
    code, output = invoke(
        *common, "--method", "activethief-entropy", "--k", "30", "--rounds", "2", "--epochs", "1",
        "--round-epochs", "1", "--batch-size", "32", "-o", str(checkpoint),
    )  # fmt: skip
    assert code == 0, output
    metrics = load_checkpoint(checkpoint).metrics
    assert metrics["queries_bought"] == metrics["queries_paid"] == 30 == service.used
    assert [record["bought"] for record in metrics["rounds"]] == [3, 14, 13]
