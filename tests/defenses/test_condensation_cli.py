"""``defender condense``: writes the npz and the PNG grid, removes its state when done, and
refuses bad settings by name before condensing anything."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from defenses.cli import app


def test_condense_writes_an_npz_and_a_grid(tmp_path) -> None:
    out = tmp_path / "dm.npz"
    result = CliRunner().invoke(
        app,
        ["condense", "--method", "dm", "--ipc", "2", "--init", "real", "--iterations", "2",
         "--batch-real", "4", "--pool-per-class", "5", "--seed", "3", "-o", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with np.load(out, allow_pickle=False) as npz:
        assert npz["images"].shape == (20, 1, 28, 28) and npz["images"].dtype == np.float32
        assert npz["labels"].tolist() == [c for c in range(10) for _ in range(2)]
        provenance = json.loads(str(npz["provenance"]))
    assert provenance["condensed"]["seed"] == 3 and len(provenance["members"]["indices"]) == 50
    assert (tmp_path / "dm.png").stat().st_size > 0
    assert not (tmp_path / "dm.npz.state.pt").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "kmeans"], "method must be one of ['dc', 'dm'], got 'kmeans'"),
        (
            ["--method", "dm", "--init", "zeros"],
            "init must be one of ['noise', 'real'], got 'zeros'",
        ),
        (["--method", "dm", "--ipc", "0"], "ipc must be >= 1, got 0"),
        (["--method", "dc", "--ipc", "251"], "ipc must be in 1..250"),
        (["--method", "dm", "--images", "mnist-embedded:nope"], "split of mnist-embedded"),
    ],
)
def test_condense_refuses_bad_settings(tmp_path, args, message) -> None:
    out = tmp_path / "x.npz"
    result = CliRunner().invoke(app, ["condense", *args, "-o", str(out)])
    assert result.exit_code == 2
    assert message in " ".join(result.output.replace("│", " ").split())
    assert not out.exists()


def test_condense_eval_prints_our_accuracy_beside_the_anchors(tmp_path) -> None:
    """A (fake, random-pixel) DC set of 10 per class: the table names both architectures, the
    random real baseline, and the DC paper's 97.4% and random-subset 95.1% at 10 per class."""
    path = tmp_path / "dc.npz"
    rng = np.random.default_rng(0)
    np.savez(
        path,
        images=rng.random((100, 1, 28, 28), dtype=np.float32),
        labels=np.repeat(np.arange(10), 10),
        provenance=np.array(json.dumps({"condensed": {"method": "dc"}})),
    )
    result = CliRunner().invoke(app, ["condense-eval", str(path), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "%" in line]
    assert any("dc ipc 10" in r and "convnet" in r and "97.4%" in r for r in rows)
    assert any("dc ipc 10" in r and "lenet5" in r and "97.4%" in r for r in rows)
    assert any("random real ipc" in r and "convnet" in r and "95.1%" in r for r in rows)
