"""benchmarks/unlearnable.py's measuring parts (issue 12): the feature-MI estimator tells paired
features from unpaired ones, the countermeasures keep images in [0, 1] and soft labels summing
to one, the "first eps under a level" read-out picks the smallest eps, row 6's budgets above the
pool are refused (the defaults capped, with a message) and its within-class MI sees class-wise
noise; a --variant runs a method with options under its own label; --no-clean leaves the
baseline to a later run. Rows 3 and 6 against a real service:
tests/e2e/test_unlearnable_rows_e2e.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import unlearnable
from benchmarks.unlearnable import (
    augment,
    feature_mutual_information,
    first_eps_below,
    jpeg,
    parse_eps,
    parse_variant,
    run_job,
    summarise,
    to_markdown,
)
from benchmarks.unlearnable_service import (
    as_dataset,
    cap_ks,
    check_ks,
    class_mutual_information,
    mean_within_class_mi,
)
from mlcore.datasets import balanced_subset_indices, load_dataset


def test_feature_mi_is_high_for_the_same_features_and_low_for_shuffled_ones():
    features = torch.rand(500, 6, generator=torch.Generator().manual_seed(0))
    shuffled = features[torch.randperm(500, generator=torch.Generator().manual_seed(1))]
    same = feature_mutual_information(features, features)
    unpaired = feature_mutual_information(features, shuffled)
    assert same > 2.5  # log(20 bins) = 3.0 nats for identical, evenly binned features
    assert unpaired < 0.6  # the plug-in estimator's bias: about (20 - 1)^2 / (2 x 500) = 0.36


@pytest.mark.parametrize("kind", ["gaussian", "cutout", "mixup", "cutmix"])
def test_countermeasures_keep_images_in_range_and_labels_a_distribution(kind):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(16, 1, 28, 28, generator=generator)
    targets = torch.nn.functional.one_hot(torch.arange(16) % 10, 10).float()
    out, soft = augment(kind, images, targets, generator)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert torch.allclose(soft.sum(dim=1), torch.ones(16))
    assert not torch.equal(out, images)


def test_jpeg_round_trip_changes_noise_but_keeps_the_range():
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    squeezed = jpeg(images, quality=10)
    assert squeezed.shape == images.shape and squeezed.min() >= 0 and squeezed.max() <= 1
    assert (squeezed - images).abs().mean() > 0.05


def test_first_eps_below_picks_the_smallest_eps_under_the_level():
    summary = [
        {"row": 2, "variant": "lenet5", "method": "m", "eps": eps, "mean": mean}
        for eps, mean in (("64/255", 0.1), ("16/255", 0.7), ("32/255", 0.4))
    ]
    assert first_eps_below(summary, 0.5) == {"m": "32/255"}
    assert first_eps_below(summary, 0.2) == {"m": "64/255"}
    assert first_eps_below(summary, 0.05) == {"m": None}
    assert parse_eps("32/255") == pytest.approx(0.12549, abs=1e-5)


def test_the_summary_orders_eps_by_value_not_as_text():
    rows = [
        {"row": 2, "method": m, "eps": eps, "variant": "lenet5", "seed": 0, "value": 0.5}
        for m, eps in (("clean", "-"), ("m", "64/255"), ("m", "8/255"), ("m", "16/255"))
    ]
    assert [(e["method"], e["eps"]) for e in summarise(rows)] == [
        ("clean", "-"), ("m", "8/255"), ("m", "16/255"), ("m", "64/255"),
    ]  # fmt: skip


def test_row_6_lists_eps_and_k_by_value_not_as_text():
    rows = [
        {"row": 6, "method": "m", "eps": eps, "variant": f"random k={k}", "seed": 0, "value": 0.5}
        for eps in ("16/255", "8/255")
        for k in (1000, 300)
    ]
    report = to_markdown(summarise(rows), "test data")
    lines = [line for line in report.splitlines() if line.startswith("| m |")]
    assert [line.split(" | ")[1:3] for line in lines] == [
        ["8/255", "random k=300"], ["8/255", "random k=1000"],
        ["16/255", "random k=300"], ["16/255", "random k=1000"],
    ]  # fmt: skip


def test_without_row_2_the_report_takes_lenet5_from_row_7():
    """A run of rows 5 and 7 alone still fills row 5's 'none' column and row 7's drop."""
    rows = [
        {"row": 7, "method": method, "eps": eps, "variant": "feature-mi", "seed": seed,
         "value": 1.0, "lenet5_accuracy": accuracy}
        for method, eps, accuracy in (("clean", "-", 0.9), ("m", "32/255", 0.6))
        for seed in (0, 1)
    ] + [
        {"row": 5, "method": "m", "eps": "32/255", "variant": "cutout", "seed": seed,
         "value": 0.7}
        for seed in (0, 1)
    ]  # fmt: skip
    report = to_markdown(summarise(rows), "test data")
    assert "| m | 32/255 | 60.0% ± 0.0 (2) | 70.0% ± 0.0 (2) |" in report
    assert "| m | 32/255 | 1.0 ± 0.0 (2) | 30.0 points |" in report


def test_a_k_above_the_pool_is_refused_and_the_default_ks_are_capped():
    with pytest.raises(ValueError, match=r"k must be in 1\.\.60 \(the pool's size\), got 61"):
        check_ks([10, 61], 60)
    with pytest.raises(ValueError, match="got 0"):
        check_ks([0], 60)
    assert check_ks([30, 10, 30], 60) == [10, 30]
    kept, message = cap_ks([100, 300, 600, 1000, 1500], 300)
    assert kept == [100, 300] and "capped at 300" in message and "[600, 1000, 1500]" in message
    assert cap_ks([100, 300], 1500) == ([100, 300], None)
    kept, message = cap_ks([100, 300, 600], 250)
    assert kept == [100, 250] and message is not None


def test_the_script_refuses_a_k_above_the_pool_before_running_anything(
    monkeypatch, capsys, tmp_path
):
    argv = ["unlearnable.py", "--rows", "6", "--size", "50", "--steal-ks", "10", "51",
            "--output", str(tmp_path / "out.json")]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as stopped:
        unlearnable.main()
    assert stopped.value.code == 2
    assert "--steal-ks: k must be in 1..50 (the pool's size), got 51" in capsys.readouterr().err
    assert not (tmp_path / "out.rows.jsonl").exists()


def test_class_wise_noise_raises_drmi_mutual_information_within_a_class():
    """A noise pattern shared by a class is information every pair of its images shares."""
    pool = load_dataset("mnist-embedded:pool")
    pool = pool.subset(balanced_subset_indices(pool.labels, 60, seed=0))
    clean = pool.as_float()
    generator = torch.Generator().manual_seed(0)
    pattern = (torch.rand(10, 1, 28, 28, generator=generator) - 0.5) * (2 * 32 / 255)
    protected = (clean + pattern[pool.labels]).clamp(0, 1)
    clean_mi = class_mutual_information(as_dataset("clean", clean, pool.labels))
    protected_mi = class_mutual_information(as_dataset("protected", protected, pool.labels))
    before, after = mean_within_class_mi(clean_mi), mean_within_class_mi(protected_mi)
    assert before is not None and after is not None and after > before + 0.1, (before, after)
    assert mean_within_class_mi(clean_mi, np.array([0, 1])) is not None  # both of class 0
    assert mean_within_class_mi(clean_mi, np.array([0, 6])) is None  # one image per class
    chosen = np.flatnonzero(pool.labels.numpy() < 2)  # classes 0 and 1 only
    assert mean_within_class_mi(clean_mi, chosen) == pytest.approx(
        np.mean([m[np.ix_(range(6), range(6))].sum() / 30 for _, m in list(clean_mi.values())[:2]])
    )


def test_a_variant_is_a_method_with_options_under_its_own_label():
    label, (method, options) = parse_variant('em-classwise-b7=em-classwise:{"block": 7}')
    assert (label, method, options) == ("em-classwise-b7", "em-classwise", {"block": 7})
    for text, message in (
        ("em-classwise=em-classwise:{}", "LABEL must be a new"),
        ("Big=em-classwise:{}", "LABEL must be a new"),
        ("b7=nope:{}", "unknown method 'nope'"),
        ("b7=em-classwise:{block: 7}", "not JSON"),
        ("b7=em-classwise:[7]", "a JSON object"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_variant(text)
    fast = {"block": 7, "max_rounds": 1, "train_steps": 1, "pgd_steps": 1}
    job = {"method": "b7", "eps": "16/255", "seed": 0, "epochs": 1, "rows": [2],
           "archs": ["linear"], "data_root": None, "size": 100, "options": {},
           "variants": {"b7": ("em-classwise", fast)}}  # fmt: skip
    (row,) = run_job(job)
    assert row["method"] == "b7" and row["variant"] == "linear"
    assert row["info"]["method"] == "em-classwise" and row["info"]["settings"]["block"] == 7


def test_no_clean_skips_the_baseline_and_a_later_run_adds_it(monkeypatch, capsys, tmp_path):
    """--no-clean measures only the protections; the same command without it resumes the rows
    file and adds the clean baseline (the protected jobs already there are not run again)."""
    output = tmp_path / "out.json"
    argv = ["unlearnable.py", "--rows", "2", "--archs", "linear", "--size", "40", "--seeds", "1",
            "--eps", "16/255", "--methods", "random", "--epochs", "1",
            "--output", str(output)]  # fmt: skip
    monkeypatch.setattr("sys.argv", [*argv, "--no-clean"])
    assert unlearnable.main() == 0
    report = json.loads(output.read_text())
    assert [(r["method"], r["variant"]) for r in report["rows"]] == [("random", "linear")]
    monkeypatch.setattr("sys.argv", argv)
    assert unlearnable.main() == 0
    assert "1 jobs done before, 1 to go" in capsys.readouterr().out
    report = json.loads(output.read_text())
    assert sorted(r["method"] for r in report["rows"]) == ["clean", "random"]
