"""`make demo`: the whole range on the embedded default, in a few minutes, from a fresh clone.

1. Start the target service (a missing LeNet-5 checkpoint is trained first, and logged).
2. Show the service as a customer sees it: answered queries, refused ones, usage.
3. Give a DRMI attacker and a random-selection attacker the same budget, let each steal a
   substitute with `attacker run`, and print their accuracy and agreement side by side.
4. Stop the service.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx2
import numpy as np
from rich.console import Console
from rich.table import Table

from mlcore.datasets import load_dataset
from mlcore.wire import encode_tensor
from target_service.testing import LiveServer, admin_create_client

console = Console()
ROOT = Path(__file__).resolve().parent.parent


def show_customer_view(server: LiveServer) -> None:
    """A few real queries, including refused ones, and the client's usage afterwards."""
    client_id, key = admin_create_client(server, "demo-customer", budget=3)
    test = load_dataset("mnist-embedded:test")
    picks = np.random.default_rng(0).choice(len(test), size=4, replace=False)
    images, truth = test.images[picks].numpy(), test.labels[picks].tolist()
    table = Table("request", "status", "answer", title="A customer with a budget of 3 queries")
    with server.client() as http:
        calls = [
            ("2 images, valid key", key, images[:2]),
            ("2 more images (only 1 query left)", key, images[2:]),
            ("1 image, no API key", None, images[:1]),
            ("1 image, 1 query left", key, images[2:3]),
        ]
        for label, api_key, batch in calls:
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            body = {"inputs": encode_tensor(batch).model_dump()}
            response = http.post("/v1/models/lenet5-mnist/predict", json=body, headers=headers)
            table.add_row(label, str(response.status_code), json.dumps(response.json()))
        usage = http.get(f"/v1/admin/clients/{client_id}", headers=server.admin_headers).json()
    console.print(table)
    console.print(f"true labels of the 4 images: {truth}")
    console.print(
        f"usage: {usage['queries_used']} of {usage['budget']} queries used "
        "(refused requests are never charged)\n"
    )


TRANSFER_SEEDS = 10  # targeted: 9 examples per seed, plus as many same-size noise probes


def run_attacks(server: LiveServer, budgets: list[int], work: Path) -> list[dict]:
    """`attacker run` once per method, each with its own account and the same budget: the
    labels for every k, then a targeted transfer attack from the largest substitute."""
    _, eval_key = admin_create_client(server, "demo-evaluator", budget=1000)
    budget = sum(budgets) + 2 * 9 * TRANSFER_SEEDS
    reports = []
    for method in ("random", "drmi"):
        _, key = admin_create_client(server, f"demo-{method}", budget=budget)
        report_dir = work / f"reports-{method}"
        command = [
            sys.executable, "-m", "attacker.cli", "run", "--url", server.url, "--api-key", key,
            "--eval-api-key", eval_key, "--model", "lenet5-mnist", "--method", method,
            "--cache", str(work / f"cache-{method}.sqlite3"), "--report-dir", str(report_dir),
            "--transfer-seeds", str(TRANSFER_SEEDS),
        ]  # fmt: skip
        for k in budgets:
            command += ["--k", str(k)]
        console.rule(f"attacker run --method {method}")
        subprocess.run(command, check=True)
        reports.append(json.loads((report_dir / "report.json").read_text()))
    return reports


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, action="append", help="budget(s); default 100 and 300")
    parser.add_argument("--checkpoint-dir", type=Path, default=ROOT / "checkpoints")
    args = parser.parse_args()
    budgets = sorted(args.k or [100, 300])
    work = Path(tempfile.mkdtemp(prefix="mlaas-demo-"))
    console.rule("target service")
    console.print(
        "starting target-service (trains lenet5-mnist first if its checkpoint is missing)"
    )
    server = LiveServer(
        checkpoint_dir=args.checkpoint_dir,
        state_dir=work / "state",
        env={"train_missing": True},
        log_level="info",
        startup_timeout=1800,
    )
    with server:
        models = httpx2.get(f"{server.url}/v1/models").json()["models"]
        console.print(f"serving {[m['name'] for m in models]} at {server.url}\n")
        show_customer_view(server)
        reports = run_attacks(server, budgets, work)
    console.rule("DRMI against random selection, same target, same pool, same budgets")
    table = Table(
        "queries", "random accuracy", "DRMI accuracy", "random agreement", "DRMI agreement"
    )
    by_method = {report["method"]: {run["k"]: run for run in report["runs"]} for report in reports}
    for k in budgets:
        rand, drmi = by_method["random"][k], by_method["drmi"][k]
        table.add_row(
            str(k),
            f"{rand['substitute_accuracy']:.2%}",
            f"{drmi['substitute_accuracy']:.2%}",
            f"{rand['agreement']:.2%}",
            f"{drmi['agreement']:.2%}",
        )
    console.print(table)
    transfer = {report["method"]: report.get("transfer") or {} for report in reports}
    if all("transferability" in t for t in transfer.values()):
        console.print(
            f"targeted PGD (eps {transfer['drmi'].get('eps')}) crafted on the k={budgets[-1]} "
            f"substitute, sent to the target: transferability random "
            f"{transfer['random']['transferability']:.2%}, DRMI {transfer['drmi']['transferability']:.2%} "
            f"(same-size random noise: {transfer['drmi']['noise_baseline']:.2%})"
        )
    console.print(f"reports and the server log are under {work}; the service has been stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
