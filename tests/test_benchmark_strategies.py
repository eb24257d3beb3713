"""The extraction and detection benchmarks run every registered strategy (issue 13), and a cut
extraction run still covers every strategy and budget."""

from attacker.selection import SELECTORS
from attacker.selection.online import ADAPTIVE_METHODS
from benchmarks.extraction_vs_queries import seed_major, to_markdown
from benchmarks.strategies import discover


def test_discover_lists_every_registered_selector_and_adaptive_strategy():
    methods = {strategy.method for strategy in discover(art=False)}
    assert set(SELECTORS) | set(ADAPTIVE_METHODS) | {"jbda"} <= methods


def test_discover_runs_drmi_once_per_alpha_and_init():
    names = [s.name for s in discover(alphas=(1.0, 2.0), inits=("min-sum", "min-max"), art=False)]
    assert [n for n in names if n.startswith("DRMI")] == [
        "DRMI min-sum a=1", "DRMI min-sum a=2", "DRMI min-max a=1", "DRMI min-max a=2",
    ]  # fmt: skip


def test_seed_major_puts_every_strategy_and_budget_of_a_seed_before_the_next_seed():
    jobs = [
        {"strategy": name, "k": k, "seed": seed}
        for name in ("a", "b")
        for k in (50, 600)
        for seed in (0, 1)
    ]
    ordered = seed_major(jobs)
    assert [job["seed"] for job in ordered] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert {(job["strategy"], job["k"]) for job in ordered[:4]} == {
        ("a", 50), ("a", 600), ("b", 50), ("b", 600),
    }  # fmt: skip


def test_markdown_shows_a_spread_only_over_several_seeds():
    row = {"setting": "embedded", "strategy": "random", "k": 50, "queries_paid_max": 50}
    summary = [
        row | {"seeds": 1, "accuracy_mean": 0.5, "accuracy_std": 0.0}
        | {"agreement_mean": 0.5, "agreement_std": 0.0},
        row | {"k": 150, "queries_paid_max": 150, "seeds": 2, "accuracy_mean": 0.8}
        | {"accuracy_std": 0.01, "agreement_mean": 0.8, "agreement_std": 0.01},
    ]  # fmt: skip
    table = to_markdown(summary, [50, 150])
    assert "| random | 50.00% (n=1) | 80.00% ± 1.00% [84.97%] |" in table
