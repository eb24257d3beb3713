"""Run reports a person can read: ``report.json`` (the stable interface), ``report.md`` and,
when several budgets were run, ``accuracy_vs_queries.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2%}" if 0.0 <= value <= 1.0 else f"{value:.3g}"
    return str(value)


def write_report(report_dir: str | Path, runs: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Write the report of one or more extraction runs; the last run is the headline.

    ``report.json`` has the headline run's fields at the top level (``method``, ``k``,
    ``queries_bought``, ``substitute_accuracy``, ``agreement``...) plus ``runs`` and ``meta``.
    """
    if not runs:
        raise ValueError("a report needs at least one run")
    folder = Path(report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    report = {**runs[-1], "runs": runs, "meta": meta}
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    columns = [
        "method",
        "k",
        "queries_bought",
        "queries_paid",
        "queries_replayed",
        "queries_from_cache",
        "stopped_by",
        "substitute_accuracy",
        "agreement",
        "train_seconds",
    ]
    lines = [
        f"# Extraction report: {meta.get('model', '?')} at {meta.get('url', 'local')}",
        "",
        f"Pool `{meta.get('pool')}`, substitute `{meta.get('arch')}`, test set `{meta.get('test')}`.",
        "`queries_bought` = labels the substitute learnt from; `queries_paid` = queries the"
        " service charged this API key in this run (its own `charged` figures);"
        " `queries_replayed` = answers to a repeated request id (charged 0);"
        " `queries_from_cache` = labels from the local answer cache (never asked for);"
        " `stopped_by` = budget (402) or blocked (403) when the service stopped a purchase.",
        "",
    ]
    if meta.get("shared_cache"):
        lines += [
            f"**Shared answer cache** `{meta['shared_cache']}`: labels other accounts paid for"
            " were reused (a Sybil strategy), so `queries_paid` understates what the labels cost.",
            "",
        ]
    lines += [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_fmt(run.get(col)) for col in columns) + " |" for run in runs]
    lines += _online_notes(runs)
    if len({run["k"] for run in runs}) > 1:
        _plot(folder / "accuracy_vs_queries.png", runs)
        lines += ["", "![substitute accuracy against queries](accuracy_vs_queries.png)"]
    (folder / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "report.json"


def _online_notes(runs: list[dict[str, Any]]) -> list[str]:
    """How each online run bought its labels: its rounds, and where a guide came from."""
    sources = {
        "target": "the target's probabilities of the whole pool (one paid query per pool image)",
        "seed-model": "the attacker's own model, trained on a random seed round it bought",
    }
    notes = []
    for run in runs:
        if run.get("rounds"):
            sizes = ", ".join(str(record["bought"]) for record in run["rounds"])
            notes.append(f"- {run['method']} at k={run['k']}: labels bought per round {sizes}")
        if run.get("accounts"):  # a Sybil run (attacker.sybil)
            paid = ", ".join(
                f"{a['account']}: {a['queries_paid']}"
                + (f" ({a['stopped_by']})" if a["stopped_by"] else "")
                for a in run["accounts"]
            )
            notes.append(
                f"- {run['method']} at k={run['k']}: split {run['split']} across "
                f"{len(run['accounts'])} accounts; queries paid per account {paid}"
            )
        if run.get("guide_source") in sources:
            notes.append(
                f"- {run['method']} at k={run['k']}: guide from {sources[run['guide_source']]}"
            )
    return ["", *notes] if notes else []


def _plot(path: Path, runs: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({run["method"] for run in runs}):
        points = sorted(
            (run["k"], run["substitute_accuracy"]) for run in runs if run["method"] == method
        )
        ax.plot([k for k, _ in points], [acc for _, acc in points], marker="o", label=method)
    ax.set_xlabel("queries (labels bought)")
    ax.set_ylabel("substitute test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
