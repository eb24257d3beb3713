"""The transfer step's report: ``transfer.json`` (the stable interface), ``transfer.md`` and two
plots, ``confusion.png`` (the paper's Figures 4-5) and ``success_vs_queries.png``.

``attach_to_run_report`` adds the same step to the report of ``attacker run``: a ``transfer`` key
in ``report.json`` and a section at the end of ``report.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["attach_to_run_report", "transfer_markdown", "write_transfer_report"]

# Scalars that ``attacker run`` copies into report.json["transfer"] (the rest is in transfer.json).
RUN_SUMMARY_KEYS = (
    "targeted",
    "attack",
    "norm",
    "eps",
    "steps",
    "seeds",
    "crafted",
    "fooled_substitute",
    "sent",
    "rejected",
    "fooled_target",
    "send",
    "transferability",
    "transferability_all",
    "noise_baseline",
    "noise_queries",
    "queries_asked",
    "queries_paid",
    "queries_replayed",
    "queries_from_cache",
    "queries_rejected",
    "stopped_by",
    "mean_linf",
    "mean_l2",
    "seconds_per_example",
)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def transfer_markdown(summary: dict[str, Any], *, heading: str = "#") -> list[str]:
    """Markdown lines describing one transfer step (``heading`` sets the title level)."""
    mode = "targeted" if summary["targeted"] else "untargeted"
    rule = (
        "the target says the wanted class"
        if summary["targeted"]
        else "the target's label differs from the seed's true label"
    )
    noise = summary.get("noise_baseline")
    send_all = summary.get("send") == "all"
    sent_what = "every crafted example" if send_all else "the examples that fooled the substitute"
    lines = [
        f"{heading} Transfer attack: {mode} {summary['attack_description']}",
        "",
        f"{summary['seeds']} seeds from `{summary['seed_set']}` ({summary['seed_rule']}); "
        f"{_settings(summary)}. Success on the target: {rule}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| adversarial examples crafted on the substitute | {summary['crafted']} |",
        f"| fooled the substitute (after 8-bit quantisation) | {summary['fooled_substitute']} "
        f"({_pct(summary['substitute_success'])}) |",
        f"| sent to the target (one query each): {sent_what} | {summary['sent']} |",
        f"| refused by the target's input defence (charged, no label) | {summary['rejected']} "
        f"({_pct(summary['rejected_share'])}) |",
        f"| got through and fooled the target | {summary['fooled_target']} "
        f"({_pct(summary['transferability_answered'])} of the {summary['answered']} answered) |",
        f"| **transferability** (ours, conditional: seeds the substitute gets right, examples "
        f"that fool it; {summary['conditional_fooled_target']} of {summary['conditional_sent']}) "
        f"| **{_pct(summary['transferability'])}** |",
        "| transferability over all crafted examples (the paper's definition) | "
        + (_pct(summary["transferability_all"]) if send_all else "not measured (`--send-all`)")
        + " |",
        f"| random noise of the same size (baseline) | {_pct(noise)}"
        + (f" of {summary['noise_sent']} probes |" if noise is not None else " (not measured) |"),
        f"| mean perturbation of the examples sent, L-inf / L2 | {_num(summary['mean_linf'])} / "
        f"{_num(summary['mean_l2'])} |",
        f"| crafting time per example | {summary['seconds_per_example'] * 1000:.1f} ms |",
        f"| queries asked in this step (examples + noise probes) | {summary['queries_asked']} "
        f"({summary['sent']} + {summary['noise_queries']}) |",
        f"| of which charged by the service / replayed uncharged / from the answer cache | "
        f"{summary['queries_paid']} / {summary['queries_replayed']} / "
        f"{summary['queries_from_cache']} |",
    ]
    if summary.get("adaptive"):
        lines += ["", *_adaptive_markdown(summary["adaptive"])]
    if summary.get("shared_cache"):
        lines += ["", f"**Shared answer cache** `{summary['shared_cache']}`: labels other "
                  "accounts paid for were reused (a Sybil strategy)."]  # fmt: skip
    if summary["fooled_substitute"] == 0:
        lines += ["", "**No example fooled the substitute, so nothing was sent.** A substitute "
                  "that cannot be fooled this way is usually a poor one (see its accuracy)."]  # fmt: skip
    if summary.get("stopped_by") is not None:
        why = (
            "the budget ran out" if summary["stopped_by"] == "budget" else "the service blocked us"
        )
        lines += ["", f"**Stopped early: {why}** ({summary.get('stop_message')}); figures cover "
                  "what was sent before that."]  # fmt: skip
    per_class = summary["per_class"]
    classes = range(len(per_class["sent"]))
    lines += [
        "",
        "Success on the target by the seed's class:",
        "",
        "| class | " + " | ".join(str(c) for c in classes) + " |",
        "|---|" + "---|" * len(per_class["sent"]),
        "| sent | " + " | ".join(str(n) for n in per_class["sent"]) + " |",
        "| success | " + " | ".join(_pct(v) for v in per_class["success"]) + " |",
    ]
    return lines


def _settings(summary: dict[str, Any]) -> str:
    """The attack's parameters in words, e.g. 'PGD 40 steps of 0.03125, random start on'."""
    name = summary["attack"]
    if name == "CW-L2":
        return (
            f"C&W L2 with kappa {summary['kappa']:g}, {summary['binary_search_steps']} rounds of "
            f"binary search over c from {summary['initial_const']:g}, up to {summary['steps']} "
            f"Adam steps of {summary['learning_rate']:g} each"
        )
    text = f"{name} {summary['steps']} steps of {summary['step_size']:.4g}"
    if "random_start" in summary:
        text += f", random start {'on' if summary['random_start'] else 'off'}"
    return text


def _adaptive_markdown(adaptive: dict[str, Any]) -> list[str]:
    """The adaptive attacker's twin and the divergence of what it sent."""
    cost = adaptive.get("twin_queries") or {}
    return [
        "**Adaptive attack** (it knows the KL-sanitisation defence): twin self-sanitised at "
        f"{adaptive['twin_threshold']:g} keeps {adaptive['twin_kept']} of the "
        f"{adaptive['twin_bought']} bought images ({adaptive['twin_epochs']} epochs"
        + (
            f"; its labels cost {cost.get('queries_paid', 0)} paid, "
            f"{cost.get('queries_from_cache', 0)} from the cache)"
            if cost
            else ")"
        )
        + f"; PGD objective minus {adaptive['kl_weight']:g} x KL(substitute || twin).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| mean / median KL(substitute &#124;&#124; twin) of the examples sent | "
        f"{_num(adaptive['mean_kl_sent'], 5)} / {_num(adaptive['median_kl_sent'], 5)} |",
        f"| mean KL on {adaptive['normal_images']} normal images | "
        f"{_num(adaptive['mean_kl_normal'], 5)} |",
        f"| examples sent under our own {adaptive['own_pass_rate']:.0%}-pass threshold "
        f"({adaptive['own_threshold']:.3g}) | {adaptive['sent_under_own_threshold']} |",
        f"| passed the defended target and fooled it | {adaptive['passed_and_fooled_target']} |",
    ]


def write_transfer_report(report_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Write transfer.json, transfer.md, confusion.png and success_vs_queries.png."""
    folder = Path(report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "transfer.json"
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot_confusion(folder / "confusion.png", summary)
    plot_success_vs_queries(folder / "success_vs_queries.png", summary)
    lines = [
        *transfer_markdown(summary),
        "",
        "![success by class](confusion.png)",
        "",
        "![success against queries](success_vs_queries.png)",
    ]
    (folder / "transfer.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def attach_to_run_report(report_dir: str | Path, summary: dict[str, Any] | None) -> None:
    """Add the transfer step to the report of ``attacker run`` (written by attacker.report).

    ``summary`` None means the step was skipped (report.json: ``"transfer": null``); a summary
    ``{"error": message}`` means it failed, and is stored as it is.
    """
    folder = Path(report_dir)
    report_path = folder / "report.json"
    report = json.loads(report_path.read_text(encoding="utf-8"))
    failed = summary is not None and "error" in summary
    if summary is None or failed:
        report["transfer"] = summary
    else:
        write_transfer_report(folder, summary)
        report["transfer"] = {key: summary.get(key) for key in RUN_SUMMARY_KEYS}
        report["transfer"]["details"] = "transfer.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if summary is None:
        return
    if failed:
        lines = ["", f"## Transfer attack: failed ({summary['error']})"]
    else:
        lines = [
            "",
            *transfer_markdown(summary, heading="##"),
            "",
            "![success by class](confusion.png) ![success against queries](success_vs_queries.png)",
            "",
            "Details: [transfer.json](transfer.json).",
        ]
    with (folder / "report.md").open("a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(path: Path, summary: dict[str, Any]) -> None:
    """Targeted: success rate by (seed class, target class) beside the paper's matrix (seed
    class x the target's label, counts; the diagonal holds failures). Untargeted: the latter."""
    import numpy as np

    plt = _pyplot()
    counts = np.asarray(summary["confusion_counts"], dtype=float)
    panels = 2 if summary["targeted"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.6), squeeze=False)
    axes = axes[0]
    if summary["targeted"]:
        rates = np.array(
            [[np.nan if v is None else v for v in row] for row in summary["confusion_success"]]
        )
        image = axes[0].imshow(rates, vmin=0.0, vmax=1.0, cmap="viridis")
        _annotate(axes[0], rates, lambda v: f"{v:.0%}")
        axes[0].set_xlabel("target class")
        axes[0].set_ylabel("seed class")
        axes[0].set_title(f"success rate (transferability {_pct(summary['transferability'])})")
        fig.colorbar(image, ax=axes[0], fraction=0.046)
    ax = axes[-1]
    image = ax.imshow(counts, cmap="viridis")
    _annotate(ax, counts, lambda v: f"{int(v)}")
    ax.set_xlabel("target model's label")
    ax.set_ylabel("seed class")
    ax.set_title("examples sent, by the target's label\n(diagonal: failed)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    for axis in axes:
        ticks = range(counts.shape[0])
        axis.set_xticks(ticks)
        axis.set_yticks(ticks)
    mode = "targeted" if summary["targeted"] else "untargeted"
    fig.suptitle(f"{mode} {summary['attack_description']} on the target")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _annotate(ax, values, fmt) -> None:
    import numpy as np

    if values.shape[0] > 12:
        return
    top = np.nanmax(values) if np.isfinite(values).any() else 0.0
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            color = "black" if top and value > 0.6 * top else "white"
            ax.text(j, i, fmt(value), ha="center", va="center", fontsize=6, color=color)


def plot_success_vs_queries(path: Path, summary: dict[str, Any]) -> None:
    """Cumulative successes on the target against queries spent, examples and noise probes."""
    plt = _pyplot()
    curve = summary["curve"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [0, *curve["queries"]],
        [0, *curve["fooled"]],
        marker=".",
        label=f"adversarial examples ({_pct(summary['transferability'])})",
    )
    if curve.get("noise_queries"):
        ax.plot(
            [0, *curve["noise_queries"]],
            [0, *curve["noise_fooled"]],
            marker=".",
            linestyle="--",
            label=f"random noise, same size ({_pct(summary['noise_baseline'])})",
        )
    ax.set_xlabel("queries spent on the target (one per image sent)")
    ax.set_ylabel("successes on the target")
    ax.set_title("transfer attack: successes against queries")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
