"""Sybil purchases (issue 14, item 5): ``attacker run --api-keys`` splits one selection across
accounts, each account keeps the one-account budget rules, and the report counts exactly what
the service charged each account and in total."""

from __future__ import annotations

import json
from pathlib import Path

import httpx2
import numpy as np
import pytest

from attacker.sybil import assign_accounts, read_api_keys
from tests.attacker.fakes import FakeService, route_http_to
from tests.attacker.test_cli import URL, invoke


class Accounts:
    """One FakeService (budget and meter) per API key, as the real service keeps them."""

    def __init__(self, budgets: dict[str, int]) -> None:
        self.services = {key: FakeService(budget=budget) for key, budget in budgets.items()}
        self.order: list[str] = []  # the key of every request, in arrival order

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        key = request.headers["authorization"].removeprefix("Bearer ")
        self.order.append(key)
        return self.services[key](request)


def write_keys(folder: Path, text: str) -> Path:
    path = folder / "keys.txt"
    path.write_text(text)
    return path


def test_read_api_keys_skips_blanks_and_comments_and_names_bad_lines(tmp_path: Path) -> None:
    assert read_api_keys(write_keys(tmp_path, "# sybils\nk1\n\n  k2  \n")) == ["k1", "k2"]
    with pytest.raises(ValueError, match="line 3: the same key as line 1"):
        read_api_keys(write_keys(tmp_path, "k1\nk2\nk1\n"))
    with pytest.raises(ValueError, match="line 2: a key is one token"):
        read_api_keys(write_keys(tmp_path, "k1\nk 2\n"))
    with pytest.raises(ValueError, match="holds no key"):
        read_api_keys(write_keys(tmp_path, "# none\n\n"))
    with pytest.raises(ValueError, match="cannot be read"):
        read_api_keys(tmp_path / "missing.txt")


def test_splits_round_robin_and_by_class() -> None:
    labels = np.array([3, 3, 7, 1, 7, 1, 3])
    assert assign_accounts(labels, 3, "round-robin").tolist() == [0, 1, 2, 0, 1, 2, 0]
    by_class = assign_accounts(labels, 2, "by-class")
    for cls in (1, 3, 7):  # every query of a class goes to one account
        assert len(set(by_class[labels == cls].tolist())) == 1
    assert by_class.tolist() == [1, 1, 0, 0, 0, 0, 1]  # classes 1, 3, 7 dealt to 0, 1, 0
    with pytest.raises(ValueError, match="--split must be one of round-robin, by-class"):
        assign_accounts(labels, 2, "by-color")


@pytest.mark.parametrize("split", ["round-robin", "by-class"])
def test_run_with_api_keys_splits_one_selection_and_reports_exact_queries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, split: str
) -> None:
    accounts = Accounts({"k1": 1000, "k2": 1000, "k3": 25})  # k3 runs out part-way
    route_http_to(accounts, monkeypatch)  # type: ignore[arg-type]
    keys = write_keys(tmp_path, "k1\nk2\nk3\n")
    code, output = invoke(
        "run", "--url", URL, "--api-keys", str(keys), "--split", split, "--method", "random",
        "--k", "120", "--epochs", "1", "--no-transfer", "--report-dir", str(tmp_path / "r"),
        "--cache", str(tmp_path / "cache.sqlite3"),
    )  # fmt: skip
    assert code == 0, output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    run = report["runs"][0]
    used = {key: service.used for key, service in accounts.services.items()}
    assert [a["queries_paid"] for a in run["accounts"]] == [used["k1"], used["k2"], used["k3"]]
    assert run["queries_paid"] == sum(used.values()) == run["queries_bought"]
    assert used["k3"] == 25 and run["accounts"][2]["stopped_by"] == "budget"
    assert [a["stopped_by"] for a in run["accounts"][:2]] == [None, None]
    assert sum(a["assigned"] for a in run["accounts"]) == 120
    assert run["queries_bought"] == 120 - run["accounts"][2]["assigned"] + 25
    assert run["stopped_by"] == "budget" and run["split"] == split
    assert report["meta"]["accounts"] == 3
    assert len(set(accounts.order[:3])) == 3  # the accounts take turns from the start
    assert "across 3 accounts" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--api-key", "k1", "--api-keys", "{keys}"], "give one of --api-key"),
        ([], "give one of --api-key"),
        (["--api-keys", "{keys}", "--split", "by-color"], "--split must be one of"),
        (["--api-keys", "{keys}", "--method", "jbda", "--k", "100"], "jbda buys as it goes"),
        (["--api-keys", "{keys}", "--eval-api-key", "k2"], "--eval-api-key must differ"),
    ],
)
def test_run_with_api_keys_refuses_bad_combinations_before_buying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    accounts = Accounts({"k1": 100, "k2": 100})
    route_http_to(accounts, monkeypatch)  # type: ignore[arg-type]
    keys = str(write_keys(tmp_path, "k1\nk2\n"))
    code, output = invoke(
        "run", "--url", URL, "--no-transfer", "--report-dir", str(tmp_path / "r"),
        *[arg.replace("{keys}", keys) for arg in args],
    )  # fmt: skip
    assert code == 2 and message in output, output
    assert accounts.order == []
