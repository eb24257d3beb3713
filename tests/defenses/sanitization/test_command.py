"""``defender sanitize``: builds and saves the pair and prints its figures; bad input exits 1
with the error naming the value and writes nothing."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from defenses.cli import app
from defenses.sanitization import load_sanitized_pair


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, " ".join(result.output.split())


def test_sanitize_saves_the_pair_and_reports_its_figures(parent_path, tmp_path):
    out = tmp_path / "twin.pt"
    code, output = invoke(
        "sanitize", "--checkpoint", str(parent_path), "--threshold", "0.9", "--epochs", "1",
        "--pass-rate", "0.95", "--score", "js", "--out", str(out),
    )  # fmt: skip
    assert code == 0, output
    pair = load_sanitized_pair(out, parent_path)
    assert (pair.method, pair.threshold, pair.score_kind, pair.pass_rate) == (
        "self",
        0.9,
        "js",
        0.95,
    )
    provenance = pair.provenance
    assert f"{provenance['kept_count']} of 2500 (mnist-embedded:target-train)" in output
    assert f"js threshold at 95% pass │ {pair.score_threshold:.6g}" in output
    assert output.endswith(str(out))


def test_the_default_output_sits_beside_the_parent(parent_path, tmp_path):
    parent = tmp_path / "model.pt"
    parent.write_bytes(Path(parent_path).read_bytes())
    code, output = invoke(
        "sanitize", "--checkpoint", str(parent), "--threshold", "0.9", "--epochs", "1"
    )
    assert code == 0, output
    assert (tmp_path / "model.sanitized-self.pt").exists()


def test_bad_input_exits_1_naming_the_value_and_writes_nothing(parent_path, tmp_path):
    out = tmp_path / "twin.pt"
    for args, message in [
        (["--threshold", "1.5"], "threshold must be in (0, 1), got 1.5"),
        (["--method", "magic"], "method must be one of ['self', 'canonical'], got 'magic'"),
        (["--method", "canonical", "--fonts-dir", str(tmp_path), "--no-system-fonts"],
         f"fonts folder {tmp_path} has no usable digit font"),
    ]:  # fmt: skip
        code, output = invoke(
            "sanitize", "--checkpoint", str(parent_path), "--out", str(out), *args
        )
        assert code == 1, output
        assert message in output
    assert list(tmp_path.iterdir()) == []
