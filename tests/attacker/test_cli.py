"""The attacker CLI against a scripted service (tests/attacker/fakes.py): every figure it reports
is what the service charged, a stopped purchase keeps its labels, a benign re-run pays again,
the answer cache is per account unless shared, and ``run`` checks every option before it buys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attacker.cli import app
from mlcore.architectures import build_model
from mlcore.checkpoints import load_checkpoint, save_checkpoint
from tests.attacker.fakes import FakeService, route_http_to

URL = "http://target"


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


def run_random(key: str, folder: Path, *extra: str) -> dict:
    code, output = invoke(
        "run", "--url", URL, "--api-key", key, "--method", "random", "--epochs", "1",
        "--no-transfer", "--report-dir", str(folder), *extra,
    )  # fmt: skip
    assert code == 0, output
    return json.loads((folder / "report.json").read_text())


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch) -> FakeService:
    fake = FakeService()
    route_http_to(fake, monkeypatch)
    return fake


def test_simulate_benign_twice_with_the_same_seed_sends_and_pays_twice(
    service: FakeService,
) -> None:
    for _ in range(2):
        code, output = invoke(
            "simulate-benign", "--url", URL, "--api-key", "k", "--queries", "30", "--seed", "4"
        )
        assert code == 0, output
        assert "queries_paid 30, queries_replayed 0" in output
    assert service.used == 60 and len(service.requests) == 6


def test_extract_keeps_the_labels_bought_before_a_403_and_trains_on_them(
    service: FakeService, tmp_path: Path
) -> None:
    service.block_after = 100  # the first request (100 images) is answered, the second refused
    selection, checkpoint = tmp_path / "selection.json", tmp_path / "substitute.pt"
    assert invoke("select", "--method", "random", "--k", "150", "-o", str(selection))[0] == 0
    code, output = invoke(
        "extract", "--url", URL, "--api-key", "k", "--selection", str(selection), "--epochs", "1",
        "--cache", str(tmp_path / "cache.sqlite3"), "-o", str(checkpoint),
    )  # fmt: skip
    assert code == 0, output
    assert "blocked by the service" in output
    metrics = load_checkpoint(checkpoint).metrics
    assert metrics["stopped_by"] == "blocked"
    assert metrics["queries_bought"] == metrics["queries_paid"] == 100 == service.used


def test_run_stops_at_a_402_with_the_labels_bought_and_says_so(
    service: FakeService, tmp_path: Path
) -> None:
    service.budget = 70
    report = run_random(
        "k", tmp_path / "r", "--k", "50", "--k", "100", "--k", "200",
        "--cache", str(tmp_path / "cache.sqlite3"),
    )  # fmt: skip
    assert [run["k"] for run in report["runs"]] == [50, 100]  # the third never starts
    assert [run["stopped_by"] for run in report["runs"]] == [None, "budget"]
    assert report["queries_bought"] == report["queries_paid"] == 20  # the rest of the budget
    assert sum(run["queries_paid"] for run in report["runs"]) == 70 == service.used
    assert (tmp_path / "r" / "substitute-random-k100.pt").exists()


def test_the_answer_cache_is_per_account_unless_shared(
    service: FakeService, tmp_path: Path
) -> None:
    cache, shared = str(tmp_path / "cache.sqlite3"), str(tmp_path / "shared.sqlite3")
    first = run_random("alice", tmp_path / "a", "--k", "50", "--cache", cache)
    assert (first["queries_paid"], first["queries_from_cache"]) == (50, 0)
    again = run_random("alice", tmp_path / "a2", "--k", "50", "--cache", cache)
    assert (again["queries_paid"], again["queries_from_cache"]) == (0, 50)
    other = run_random("bob", tmp_path / "b", "--k", "50", "--cache", cache)
    assert (other["queries_paid"], other["queries_from_cache"]) == (50, 0)  # bob pays his own
    assert other["meta"]["shared_cache"] is None

    run_random("carol", tmp_path / "c", "--k", "50", "--cache", cache, "--shared-cache", shared)
    sybil = run_random("sybil", tmp_path / "s", "--k", "50", "--cache", cache, "--shared-cache", shared)  # fmt: skip
    assert (sybil["queries_paid"], sybil["queries_from_cache"]) == (0, 50)
    assert sybil["meta"]["shared_cache"] == shared
    assert "Shared answer cache" in (tmp_path / "s" / "report.md").read_text()
    assert service.used == 150


def test_transfer_send_all_sends_every_example_and_reports_both_rates(
    service: FakeService, tmp_path: Path
) -> None:
    substitute = save_checkpoint(
        tmp_path / "sub.pt", build_model("lenet5"), arch="lenet5", dataset="mnist-embedded:pool"
    )
    code, output = invoke(
        "transfer", "--url", URL, "--api-key", "k", "--substitute", str(substitute), "--seeds", "2",
        "--steps", "2", "--send-all", "--cache", str(tmp_path / "c.sqlite3"),
        "--report-dir", str(tmp_path / "r"),
    )  # fmt: skip
    assert code == 0, output
    report = json.loads((tmp_path / "r" / "transfer.json").read_text())
    assert report["send"] == "all" and report["sent"] == report["crafted"] == 18
    assert report["transferability_all"] == report["fooled_target"] / 18
    assert report["queries_paid"] == 18 + report["noise_queries"] == service.used
    assert "over every crafted example (the paper's definition)" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "random", "--method", "bogus"], "unknown method 'bogus'"),
        (["--init", "min-median"], "init must be 'min-sum' or 'min-max', got 'min-median'"),
        (["--alpha", "-1"], "alpha must be a finite number > 0, got -1"),
        (["--bins", "1"], "bins must be in 2..256, got 1"),
        (["--k", "0"], "--k for drmi must be in 1..1500 (the pool size), got 0"),
        (["--method", "random", "--k", "50", "--k", "5000"], "got 5000"),
        (["--method", "jbda", "--k", "50"], "--k for jbda must be at least 100"),
        (["--method", "jbda", "--k", "100", "--semi-supervised"], "--semi-supervised needs a pool"),
        (["--transfer-eps", "0"], "eps must be > 0"),
        (["--transfer-norm", "l3"], "norm must be one of"),
        (["--pool", "nosuch:pool"], "nosuch"),
        (["--test", "mnist-embedded:nosplit"], "nosplit"),
        (["--data-root", "/no/such/root"], "--data-root '/no/such/root' is not a folder"),
        (["--url", "ftp://target"], "--url must be an http(s) URL, got 'ftp://target'"),
        (["--api-key", ""], "--api-key must not be empty"),
        (["--api-key", "two words"], "--api-key must be one token"),
        (["--eval-api-key", "attack-key"], "--eval-api-key must differ from --api-key"),
        (["--report-dir", "{tmp}/file.txt"], "--report-dir '{tmp}/file.txt' cannot be created"),
        (["--cache", "{tmp}"], "is a folder, not a file"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_run_checks_every_option_before_it_buys_a_label(
    service: FakeService, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "file.txt").write_text("not a folder")
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    code, output = invoke(
        "run", "--url", URL, "--api-key", "attack-key", "--eval-api-key", "eval-key",
        "--cache", str(tmp_path / "cache.sqlite3"), "--report-dir", str(tmp_path / "r"), *args,
    )  # fmt: skip
    assert code == 2, output
    assert message.replace("{tmp}", str(tmp_path)) in output
    assert service.requests == []  # not one label bought, not even the evaluation's


def _transfer(substitute: Path, folder: Path, *args: str) -> dict:
    code, output = invoke(
        "transfer", "--url", URL, "--api-key", "k", "--substitute", str(substitute), "--seeds", "2",
        "--send-all", "--cache", str(folder / "c.sqlite3"), "--report-dir", str(folder / "r"),
        *args,
    )  # fmt: skip
    assert code == 0, output
    return json.loads((folder / "r" / "transfer.json").read_text())


def test_transfer_counts_the_examples_a_defended_target_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The target refuses (null label, still charged) every image whose first pixel is odd."""
    service = FakeService(reject=lambda image: int(image.reshape(-1)[0]) % 2 == 1)
    route_http_to(service, monkeypatch)
    substitute = save_checkpoint(
        tmp_path / "sub.pt", build_model("lenet5"), arch="lenet5", dataset="mnist-embedded:pool"
    )
    report = _transfer(substitute, tmp_path, "--steps", "2", "--no-noise-baseline")
    assert report["sent"] == 18 == service.used == report["queries_paid"]
    assert 0 < report["rejected"] == service.rejected == report["queries_rejected"] < 18
    assert report["answered"] == 18 - report["rejected"]
    assert report["rejected_share"] == report["rejected"] / 18
    # A refused example fools nobody: it counts as sent and failed.
    assert report["fooled_target"] <= report["answered"]
    assert report["transferability_all"] == report["fooled_target"] / 18
    assert sum(map(sum, report["confusion_counts"])) == report["answered"]
    markdown = (tmp_path / "r" / "transfer.md").read_text()
    assert f"refused by the target's input defence (charged, no label) | {report['rejected']}" in (
        markdown
    )


@pytest.mark.parametrize(
    ("args", "attack"),
    [
        (["--attack", "igsm", "--untargeted", "--steps", "2"], "IGSM"),
        (["--attack", "cw", "--steps", "3", "--binary-search-steps", "1", "--kappa", "1"], "CW-L2"),
    ],
)
def test_transfer_runs_igsm_and_cw_over_http(
    service: FakeService, tmp_path: Path, args: list[str], attack: str
) -> None:
    substitute = save_checkpoint(
        tmp_path / "sub.pt", build_model("lenet5"), arch="lenet5", dataset="mnist-embedded:pool"
    )
    report = _transfer(substitute, tmp_path, *args)
    assert report["attack"] == attack
    assert report["sent"] == report["crafted"] == (2 if attack == "IGSM" else 18)
    # A C&W example that failed is the seed itself, and so is its noise of size 0: from the cache.
    paid, cached = report["queries_paid"], report["queries_from_cache"]
    assert paid + cached == report["sent"] + report["noise_queries"] and paid == service.used
    assert report["norm"] == ("linf" if attack == "IGSM" else "l2")
    assert report["rejected"] == 0 and report["transferability_answered"] is not None
