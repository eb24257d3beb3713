"""The compose attacker: as the range operator, open an attack account and an evaluation account
on the target, then run `attacker run` with DRMI and random at the same budget."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx2


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
    budget = int(os.environ.get("ATTACK_BUDGET", "600"))
    attack_key = open_account(url, admin, "compose-attacker", 2 * budget)
    eval_key = open_account(url, admin, "compose-evaluator", 1000)
    command = [
        "attacker", "run", "--url", url, "--api-key", attack_key, "--eval-api-key", eval_key,
        "--model", "lenet5-mnist", "--method", "random", "--method", "drmi",
        "--k", str(budget), "--report-dir", "reports/compose",
    ]  # fmt: skip
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
