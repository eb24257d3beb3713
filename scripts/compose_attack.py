"""The compose attacker: as the range operator, open an attack account and an evaluation account
on the target, then run `attacker run` with DRMI and random at the same budget, and its transfer
step; the attack account's budget covers all of it (``attack_budget``)."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx2

METHODS = ("random", "drmi")
TRANSFER_SEEDS = 20
NUM_CLASSES = 10  # lenet5-mnist
EVAL_QUERIES = 1000  # the labels of mnist-embedded:test, bought by the evaluation account


def attack_budget(k: int, *, transfer_seeds: int = TRANSFER_SEEDS) -> int:
    """The most `attacker run` can buy: ``k`` labels per method, then the targeted transfer step
    sends each seed's ``NUM_CLASSES - 1`` crafted examples and as many same-size noise probes."""
    return len(METHODS) * k + 2 * transfer_seeds * (NUM_CLASSES - 1)


def open_account(url: str, admin_token: str, name: str, budget: int) -> str:
    response = httpx2.post(
        f"{url}/v1/admin/clients",
        json={"name": name, "budget": budget},
        headers={"Authorization": f"Bearer {admin_token}"},
        timeout=30,
    )
    response.raise_for_status()
    return response.json()["api_key"]


def main() -> int:
    url = os.environ.get("ATTACK_URL", "http://target:8000")
    admin = os.environ["TARGET_ADMIN_TOKEN"]
    k = int(os.environ.get("ATTACK_BUDGET", "600"))
    attack_key = open_account(url, admin, "compose-attacker", attack_budget(k))
    eval_key = open_account(url, admin, "compose-evaluator", EVAL_QUERIES)
    command = [
        "attacker", "run", "--url", url, "--api-key", attack_key, "--eval-api-key", eval_key,
        "--model", "lenet5-mnist", *[arg for m in METHODS for arg in ("--method", m)],
        "--k", str(k), "--transfer-seeds", str(TRANSFER_SEEDS), "--report-dir", "reports/compose",
    ]  # fmt: skip
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
